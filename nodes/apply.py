"""Apply DreamCache: patch a clone of MODEL with the adapters and a cache."""
from comfy_api.v0_0_2 import io

from ..dreamcache_core.method.cache import parse_reference_weights
from ..dreamcache_core.method.controls import DEFAULT_LAYER_PRESET, LAYER_PRESETS, Controls, layer_weight_entries
from ..dreamcache_core.method.input_checks import GROUP_WEIGHT_RANGE, PERCENT_RANGE, STRENGTH_RANGE
from ..dreamcache_core.comfy_bridge import attach_injection, build_injections
from ..dreamcache_core.method.patch import NEGATIVE_CHUNK, POSITIVE_CHUNK
from ..dreamcache_core.method.schedules import CONSTANT_SCHEDULE, STEP_SCHEDULES, parse_frame_weights
from .io_types import CATEGORY_SAMPLING, Adapter, Cache
from .widget_checks import (check_number_inputs, choice_problem, text_problem, validation_result,
                            widget_problems)

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
LAYER_PRESET_TOOLTIP = ("Which memory layers are personalised, by what they do: 'shape (middle)' = the middle layer "
                        "(shape and identity), 'appearance (decoder)' = the decoder layers (colour, texture), "
                        "'composition (middle + coarse decoder)' = the middle and the lower-resolution half of the "
                        "decoder, 'detail (fine decoder)' = the higher-resolution half only. middle/decoder_weight "
                        "multiply it; layer_weights override it per layer.")
WEIGHT_SCHEDULE_TOOLTIP = ("How the strength changes from start_percent to end_percent: 'linear' = the same on every "
                           "step; 'ease in' = full at the start fading to 0 (the subject sets shape and layout, the "
                           "prompt finishes); 'ease out' = 0 growing to full (the prompt sets the layout, the subject "
                           "comes in late); 'ease in-out' = 0 at both ends, full in the middle; 'reverse in-out' = full "
                           "at both ends, 0 in the middle.")
FRAME_WEIGHTS_TOOLTIP = ("A strength factor per image of the latent batch (per frame of an animation): one weight per "
                         "frame ('1, 0.8, 0.5'; the last holds for later frames) or keyframes frame=weight ('0=1, 15=0', "
                         "linear in between). Empty = 1 for every frame; 0 leaves that frame exactly unpersonalised.")
ADAPTER_TOOLTIP = ("Adapters trained for this base model, from Load DreamCache Adapter (files in "
                   "ComfyUI/models/dreamcache). Released today: the authors' SD2.1-base adapter (linked from "
                   "github.com/Emanuele97x/DreamCache); SD1.5 and SDXL adapters are trained with the pack's training "
                   "script.")
NEGATIVE_CACHE_TOOLTIP = ("Optional negative reference (e.g. Encode DreamCache of a Reference Noise image, or another "
                          "subject, or Combine's negative_cache): injected where the sampler's negative prompt is "
                          "evaluated instead of no reference, so sampling steers away from it (KSampler at cfg 1 "
                          "evaluates no negative prompt, so it has no effect there).")


def optional_control_inputs(with_schedule=True, negative_tooltip=NEGATIVE_CACHE_TOOLTIP):
    """Optional inputs shared by Apply DreamCache and the DreamCache Guider (new ones go last, so the widget
    values of saved workflows keep their places)."""
    inputs = [
        io.Mask.Input("attn_mask", optional=True, tooltip=ATTN_MASK_TOOLTIP),
        io.Combo.Input("reference_mode", options=list(REFERENCE_MODES), default="all references shared",
                       optional=True, tooltip=REFERENCE_MODE_TOOLTIP),
        io.String.Input("reference_weights", default="", multiline=False, optional=True,
                        tooltip=REFERENCE_WEIGHTS_TOOLTIP),
    ]
    if with_schedule:
        inputs += [
            io.Float.Input("middle_weight", default=1.0, min=GROUP_WEIGHT_RANGE[0], max=GROUP_WEIGHT_RANGE[1],
                           step=0.01, optional=True,
                           tooltip="Multiplies the strength at the middle (lowest-resolution) memory layer: shape "
                                   "and identity."),
            io.Float.Input("decoder_weight", default=1.0, min=GROUP_WEIGHT_RANGE[0], max=GROUP_WEIGHT_RANGE[1],
                           step=0.01, optional=True,
                           tooltip="Multiplies the strength at the decoder memory layers: appearance and detail."),
            io.String.Input("layer_weights", default="", multiline=False, optional=True,
                            tooltip="Per-layer multipliers that override middle/decoder_weight, e.g. "
                                    "'output_blocks.4.1=0.5, output.10=0' (layer keys, block names like output.4, "
                                    "or middle / decoder); each weight within +-100."),
        ]
    inputs += [
        Cache.Input("negative_cache", optional=True, tooltip=negative_tooltip),
        io.Combo.Input("layer_preset", options=list(LAYER_PRESETS), default=DEFAULT_LAYER_PRESET, optional=True,
                       tooltip=LAYER_PRESET_TOOLTIP),
    ]
    if with_schedule:
        inputs.append(io.Combo.Input("weight_schedule", options=list(STEP_SCHEDULES), default=CONSTANT_SCHEDULE,
                                     optional=True, tooltip=WEIGHT_SCHEDULE_TOOLTIP))
    inputs.append(io.String.Input("frame_weights", default="", multiline=False, optional=True,
                                  tooltip=FRAME_WEIGHTS_TOOLTIP))
    return inputs


def node_controls(strength=1.0, start_percent=0.0, end_percent=1.0, attn_mask=None,
                  reference_mode="all references shared", reference_weights="", middle_weight=1.0,
                  decoder_weight=1.0, layer_weights="", layer_preset=DEFAULT_LAYER_PRESET,
                  weight_schedule=CONSTANT_SCHEDULE, frame_weights="") -> Controls:
    """Apply DreamCache's and the Guider's control inputs, named and valued as the nodes show them (the region
    input is attn_mask, the reference modes are menu labels), as the core's ``Controls``."""
    if reference_mode not in REFERENCE_MODES:
        raise ValueError(f"reference_mode must be one of {list(REFERENCE_MODES)}, got {reference_mode!r}.")
    return Controls(strength=strength, start_percent=start_percent, end_percent=end_percent, region_mask=attn_mask,
                    reference_mode=REFERENCE_MODES[reference_mode], reference_weights=reference_weights,
                    middle_weight=middle_weight, decoder_weight=decoder_weight, layer_weights=layer_weights,
                    layer_preset=layer_preset, weight_schedule=weight_schedule, frame_weights=frame_weights)


def control_text_problems(reference_weights=None, layer_weights=None, frame_weights=None, layer_preset=None,
                          weight_schedule=None, reference_mode=None) -> list:
    """Queue-time problems of the string and menu controls, checkable without the cache or the model: the
    reference weights' numbers, the layer weights' syntax, values and name forms, the frame weights, and the
    menus' choices (ComfyUI does not check a V3 node's menu values when the prompt is queued)."""
    return [text_problem(lambda text: parse_reference_weights(text, None), reference_weights, "reference_weights"),
            text_problem(layer_weight_entries, layer_weights, "layer_weights"),
            text_problem(parse_frame_weights, frame_weights, "frame_weights"),
            choice_problem(layer_preset, LAYER_PRESETS, "layer_preset"),
            choice_problem(weight_schedule, STEP_SCHEDULES, "weight_schedule"),
            choice_problem(reference_mode, REFERENCE_MODES, "reference_mode")]


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
                Adapter.Input("adapter", tooltip=ADAPTER_TOOLTIP),
                Cache.Input("cache", tooltip="The reference cache from Encode DreamCache (same base model)."),
                io.Float.Input("strength", default=1.0, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1],
                               step=0.01,
                               tooltip="How much of the adapter's change to keep; 0 returns exactly the input model."),
                io.Float.Input("start_percent", default=0.0, min=PERCENT_RANGE[0], max=PERCENT_RANGE[1],
                               step=0.001,
                               tooltip="Sampling progress at which personalisation starts."),
                io.Float.Input("end_percent", default=1.0, min=PERCENT_RANGE[0], max=PERCENT_RANGE[1],
                               step=0.001,
                               tooltip="Sampling progress at which personalisation stops."),
                io.Combo.Input("apply_to", options=list(APPLY_TO_CHUNKS), default="positive only",
                               tooltip="'positive only' injects the reference into the positive batch only (the "
                                       "paper's joint guidance); 'positive and negative' into both. With a "
                                       "negative_cache the negative batch gets that instead."),
            ] + optional_control_inputs(),
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A personalised clone of the model, for the stock KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start_percent=None, end_percent=None, reference_weights=None,
                        middle_weight=None, decoder_weight=None, layer_weights=None, frame_weights=None,
                        layer_preset=None, weight_schedule=None, reference_mode=None, apply_to=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"strength": strength, "start_percent": start_percent,
                                         "end_percent": end_percent, "middle_weight": middle_weight,
                                         "decoder_weight": decoder_weight})
        if not problems and start_percent is not None and end_percent is not None and start_percent > end_percent:
            problems.append(f"start_percent ({start_percent}) is after end_percent ({end_percent}), so "
                            "personalisation would never run. Set start_percent <= end_percent.")
        problems.append(choice_problem(apply_to, APPLY_TO_CHUNKS, "apply_to"))
        return validation_result(problems + control_text_problems(reference_weights, layer_weights, frame_weights,
                                                                  layer_preset, weight_schedule, reference_mode))

    @classmethod
    def execute(cls, model, adapter, cache, strength, start_percent, end_percent, apply_to, attn_mask=None,
                reference_mode="all references shared", reference_weights="", middle_weight=1.0, decoder_weight=1.0,
                layer_weights="", negative_cache=None, layer_preset=DEFAULT_LAYER_PRESET,
                weight_schedule=CONSTANT_SCHEDULE, frame_weights=""):
        check_number_inputs(cls, {"strength": strength, "start_percent": start_percent, "end_percent": end_percent,
                                  "middle_weight": middle_weight, "decoder_weight": decoder_weight})
        if strength == 0:
            return io.NodeOutput(model)
        if apply_to not in APPLY_TO_CHUNKS:
            raise ValueError(f"apply_to must be one of {list(APPLY_TO_CHUNKS)}, got {apply_to!r}.")
        # with a negative reference the negative prompt's rows take it, whatever apply_to says
        chunks = (POSITIVE_CHUNK,) if negative_cache is not None else APPLY_TO_CHUNKS[apply_to]
        controls = node_controls(strength=strength, start_percent=start_percent, end_percent=end_percent,
                                 attn_mask=attn_mask, reference_mode=reference_mode,
                                 reference_weights=reference_weights, middle_weight=middle_weight,
                                 decoder_weight=decoder_weight, layer_weights=layer_weights,
                                 layer_preset=layer_preset, weight_schedule=weight_schedule,
                                 frame_weights=frame_weights)
        injections = build_injections(model, adapter, cache, controls, negative_cache, chunks, (NEGATIVE_CHUNK,))
        patched = model.clone()
        for injection in injections:
            attach_injection(patched, injection)
        return io.NodeOutput(patched)


NODES = [DreamCacheApply]
