"""DreamCache Guider: DreamCache's combined (image + text) guidance as a GUIDER for SamplerCustomAdvanced."""
from ..dreamcache_core.comfy_bridge import combined_guider
from ..dreamcache_core.guidance import REFERENCE_CHUNKS
from .apply import build_injection, control_text_problems, optional_control_inputs
from .widget_checks import validation_result, widget_problems


class DreamCacheGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to sample with (unpatched: the guider injects the reference "
                                               "itself, into the two predictions that need it)."}),
                "adapter": ("DREAMCACHE_ADAPTER", {"tooltip": "Adapters trained for this base model."}),
                "cache": ("DREAMCACHE", {"tooltip": "The reference cache from Encode DreamCache (same base model)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt describing the scene (T)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative or empty prompt: used with the reference for "
                                                         "e(I,0) and without it for e(0,0)."}),
                "text_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "s_T: how strongly the prompt is followed (authors: 7.5)."}),
                "image_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                        "tooltip": "s_I: how strongly the reference subject is kept (authors: 5.0). "
                                                   "Higher keeps more of the subject, lower edits more freely; equal "
                                                   "to text_cfg it is the stock KSampler's joint guidance."}),
            },
            "optional": optional_control_inputs(with_schedule=False),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, text_cfg=None, image_cfg=None, reference_weights=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"text_cfg": text_cfg, "image_cfg": image_cfg})
        return validation_result(problems + control_text_problems(reference_weights))

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A guider for SamplerCustomAdvanced running the three predictions per step.",)
    FUNCTION = "get_guider"
    CATEGORY = "DreamCache"
    DESCRIPTION = ("DreamCache's combined guidance: e(0,0) + image_cfg (e(I,0) - e(0,0)) + text_cfg (e(I,T) - e(I,0)), "
                   "with I the cached reference and T the prompt. The three predictions run as one batch per step "
                   "(split by ComfyUI only when memory is short). Connect it to SamplerCustomAdvanced.")

    def get_guider(self, model, adapter, cache, positive, negative, text_cfg, image_cfg, attn_mask=None,
                   reference_mode="all references shared", reference_weights=""):
        injection = build_injection(model, adapter, cache, 1.0, 0.0, 1.0, REFERENCE_CHUNKS, attn_mask, reference_mode,
                                    reference_weights)
        return (combined_guider(model, injection, positive, negative, text_cfg, image_cfg),)


NODE_CLASS_MAPPINGS = {"DreamCacheGuider": DreamCacheGuider}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheGuider": "DreamCache Guider"}
