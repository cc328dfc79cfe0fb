"""Apply DreamCache: patch a clone of MODEL with the adapters and a cache."""
from comfy_api.v0_0_2 import io

from ..dreamcache_core.method.cache import parse_reference_weights
from ..dreamcache_core.method.controls import layer_weight_entries
from ..dreamcache_core.method.injection import build_injection as core_build_injection
from ..dreamcache_core.method.patch import POSITIVE_CHUNK, attach_injection
from .io_types import CATEGORY_SAMPLING, Adapter, Cache
from .widget_checks import text_problem, validation_result, widget_problems

APPLY_TO_CHUNKS = {"positive only": (POSITIVE_CHUNK,), "positive and negative": None}
REFERENCE_MODES = {"all references shared": "shared", "one reference per image": "per_image"}

ATTN_MASK_TOOLTIP = ("Optional region over the generated image (1 = put the subject here). Any size: it is stretched to "
                     "the image and area-resized to each layer's token grid. Outside it the model is exactly the "
                     "unpatched one; partly covered or soft edges get a proportional strength. Chain two Apply nodes "
                     "with two caches and two masks for two subjects. An all-zero mask is an error.")
REFERENCE_MODE_TOOLTIP = ("How a cache with several references (a batch from Encode, or Combine DreamCache) is used. "
                          "'all references shared': every image attends to the union of all references (weighted by "
                          "reference_weights). 'one reference per image': image i of the latent batch attends to "
                          "reference i only (the cache must hold as many references as the batch has images).")
REFERENCE_WEIGHTS_TOOLTIP = ("Relative weight of each reference in shared mode, comma-separated, one per reference "
                             "(e.g. '1, 0.5'); empty = the cache's own weights (equal unless set by Combine). Added as "
                             "log(weight) to the attention logits of that reference's tokens; 0 leaves a reference out.")


def optional_control_inputs(with_schedule=True):
    """Optional inputs shared by Apply DreamCache and the DreamCache Guider."""
    inputs = [
        io.Mask.Input("attn_mask", optional=True, tooltip=ATTN_MASK_TOOLTIP),
        io.Combo.Input("reference_mode", options=list(REFERENCE_MODES), default="all references shared",
                       optional=True, tooltip=REFERENCE_MODE_TOOLTIP),
        io.String.Input("reference_weights", default="", multiline=False, optional=True,
                        tooltip=REFERENCE_WEIGHTS_TOOLTIP),
    ]
    if with_schedule:
        inputs += [
            io.Float.Input("middle_weight", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                           tooltip="Multiplies the strength at the middle (lowest-resolution) memory layer: shape "
                                   "and identity."),
            io.Float.Input("decoder_weight", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                           tooltip="Multiplies the strength at the decoder memory layers: appearance and detail."),
            io.String.Input("layer_weights", default="", multiline=False, optional=True,
                            tooltip="Per-layer multipliers that override middle/decoder_weight, e.g. "
                                    "'output_blocks.4.1=0.5, output.10=0' (layer keys, block names like output.4, "
                                    "or middle / decoder); each weight within +-100."),
        ]
    return inputs


def build_injection(model, adapter, cache, strength=1.0, start_percent=0.0, end_percent=1.0, chunks=(POSITIVE_CHUNK,),
                    attn_mask=None, reference_mode="all references shared", reference_weights="",
                    middle_weight=1.0, decoder_weight=1.0, layer_weights=""):
    """The node inputs (reference_mode as the menu names it) -> the core builder's injection, handed to
    ComfyUI's memory manager."""
    if reference_mode not in REFERENCE_MODES:
        raise ValueError(f"reference_mode must be one of {list(REFERENCE_MODES)}, got {reference_mode!r}.")
    return core_build_injection(model, adapter, cache, strength, start_percent, end_percent, chunks,
                                region_mask=attn_mask, reference_mode=REFERENCE_MODES[reference_mode],
                                reference_weights=reference_weights, middle_weight=middle_weight,
                                decoder_weight=decoder_weight, layer_weights=layer_weights, memory_managed=True)


def control_text_problems(reference_weights=None, layer_weights=None) -> list:
    """Queue-time problems of the string controls, checkable without the cache or the model: the reference
    weights' numbers, the layer weights' syntax, values and name forms."""
    return [text_problem(lambda text: parse_reference_weights(text, None), reference_weights, "reference_weights"),
            text_problem(layer_weight_entries, layer_weights, "layer_weights")]


class DreamCacheApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheApply",
            display_name="Apply DreamCache",
            category=CATEGORY_SAMPLING,
            description="Injects the cached reference into the memory layers' self-attention through the trained "
                        "adapters. Sample with the returned MODEL; use the input MODEL for unpersonalised samples.",
            inputs=[
                io.Model.Input("model", tooltip="The model to personalise. It is cloned: the input MODEL stays "
                                                "unpatched for other samplers."),
                Adapter.Input("adapter", tooltip="Adapters trained for this base model."),
                Cache.Input("cache", tooltip="The reference cache from Encode DreamCache (same base model)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="How much of the adapter's change to keep; 0 returns exactly the input model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which personalisation starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which personalisation stops."),
                io.Combo.Input("apply_to", options=list(APPLY_TO_CHUNKS), default="positive only",
                               tooltip="'positive only' injects the reference into the positive batch only (the "
                                       "paper's joint guidance); 'positive and negative' into both."),
            ] + optional_control_inputs(),
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A personalised clone of the model, for the stock KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start_percent=None, end_percent=None, reference_weights=None,
                        middle_weight=None, decoder_weight=None, layer_weights=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"strength": strength, "start_percent": start_percent,
                                         "end_percent": end_percent, "middle_weight": middle_weight,
                                         "decoder_weight": decoder_weight})
        if not problems and start_percent is not None and end_percent is not None and start_percent > end_percent:
            problems.append(f"start_percent ({start_percent}) is after end_percent ({end_percent}), so "
                            "personalisation would never run. Set start_percent <= end_percent.")
        return validation_result(problems + control_text_problems(reference_weights, layer_weights))

    @classmethod
    def execute(cls, model, adapter, cache, strength, start_percent, end_percent, apply_to, attn_mask=None,
                reference_mode="all references shared", reference_weights="", middle_weight=1.0, decoder_weight=1.0,
                layer_weights=""):
        if strength == 0:
            return io.NodeOutput(model)
        if apply_to not in APPLY_TO_CHUNKS:
            raise ValueError(f"apply_to must be one of {list(APPLY_TO_CHUNKS)}, got {apply_to!r}.")
        injection = build_injection(model, adapter, cache, strength, start_percent, end_percent,
                                    APPLY_TO_CHUNKS[apply_to], attn_mask, reference_mode, reference_weights,
                                    middle_weight, decoder_weight, layer_weights)
        return io.NodeOutput(attach_injection(model.clone(), injection))


NODES = [DreamCacheApply]
