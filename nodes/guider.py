"""DreamCache Guider: DreamCache's combined (image + text) guidance as a GUIDER for SamplerCustomAdvanced."""
from comfy_api.v0_0_2 import io

from ..dreamcache_core.comfy_bridge import build_injections, combined_guider
from ..dreamcache_core.method.controls import DEFAULT_LAYER_PRESET
from ..dreamcache_core.method.guidance import REFERENCE_CHUNKS, UNCONDITIONAL
from ..dreamcache_core.method.input_checks import GUIDANCE_SCALE_RANGE
from .apply import ADAPTER_TOOLTIP, control_text_problems, node_controls, optional_control_inputs
from .io_types import CATEGORY_SAMPLING, Adapter, Cache
from .widget_checks import check_number_inputs, validation_result, widget_problems


class DreamCacheGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheGuider",
            display_name="DreamCache Guider",
            category=CATEGORY_SAMPLING,
            description="DreamCache's combined guidance: e(0,0) + image_cfg (e(I,0) - e(0,0)) + text_cfg (e(I,T) - "
                        "e(I,0)), with I the cached reference and T the prompt. The three predictions run as one batch "
                        "per step (split by ComfyUI only when memory is short). Connect it to SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (unpatched: the guider injects the "
                                                "reference itself, into the two predictions that need it)."),
                Adapter.Input("adapter", tooltip=ADAPTER_TOOLTIP),
                Cache.Input("cache", tooltip="The reference cache from Encode DreamCache (same base model)."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the scene (T)."),
                io.Conditioning.Input("negative", tooltip="The negative or empty prompt: used with the reference for "
                                                          "e(I,0) and without it for e(0,0)."),
                io.Float.Input("text_cfg", default=7.5, min=GUIDANCE_SCALE_RANGE[0],
                               max=GUIDANCE_SCALE_RANGE[1], step=0.1, round=0.01,
                               tooltip="s_T: how strongly the prompt is followed (authors: 7.5)."),
                io.Float.Input("image_cfg", default=5.0, min=GUIDANCE_SCALE_RANGE[0],
                               max=GUIDANCE_SCALE_RANGE[1], step=0.1, round=0.01,
                               tooltip="s_I: how strongly the reference subject is kept (authors: 5.0). Higher keeps "
                                       "more of the subject, lower edits more freely; equal to text_cfg it is the "
                                       "stock KSampler's joint guidance."),
            ] + optional_control_inputs(
                with_schedule=False,
                negative_tooltip="Optional negative reference N for the unconditional image branch: e(0,0) becomes "
                                 "e(N,0), so image_cfg pushes from N towards the reference (e.g. Encode DreamCache of "
                                 "a Reference Noise image, another subject, or Combine's negative_cache). Not "
                                 "connected = no reference there, as before."),
            outputs=[io.Guider.Output(display_name="guider", tooltip="A guider for SamplerCustomAdvanced running the "
                                                                     "three predictions per step.")],
        )

    @classmethod
    def validate_inputs(cls, text_cfg=None, image_cfg=None, reference_weights=None, frame_weights=None,
                        layer_preset=None, reference_mode=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"text_cfg": text_cfg, "image_cfg": image_cfg})
        return validation_result(problems + control_text_problems(reference_weights, frame_weights=frame_weights,
                                                                  layer_preset=layer_preset,
                                                                  reference_mode=reference_mode))

    @classmethod
    def execute(cls, model, adapter, cache, positive, negative, text_cfg, image_cfg, attn_mask=None,
                reference_mode="all references shared", reference_weights="", negative_cache=None,
                layer_preset=DEFAULT_LAYER_PRESET, frame_weights=""):
        check_number_inputs(cls, {"text_cfg": text_cfg, "image_cfg": image_cfg})
        controls = node_controls(attn_mask=attn_mask, reference_mode=reference_mode,
                                 reference_weights=reference_weights, layer_preset=layer_preset,
                                 frame_weights=frame_weights)
        injections = build_injections(model, adapter, cache, controls, negative_cache, REFERENCE_CHUNKS,
                                      (UNCONDITIONAL,))
        negative_injection = injections[1] if len(injections) > 1 else None
        return io.NodeOutput(combined_guider(model, injections[0], positive, negative, text_cfg, image_cfg,
                                             negative_injection))


NODES = [DreamCacheGuider]
