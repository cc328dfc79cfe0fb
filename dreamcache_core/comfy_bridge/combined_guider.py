"""DreamCache's combined guidance as a ComfyUI GUIDER (for SamplerCustomAdvanced)."""
from __future__ import annotations

from ..method.input_checks import GUIDANCE_SCALE_RANGE, check_number
from ..method.guidance import (IMAGE_ONLY, IMAGE_TEXT, UNCONDITIONAL, combined_guidance, needed_predictions,
                               REFERENCE_CHUNKS)
from .injection_patches import attach_injection

_GUIDER_CLASS = None


def combined_guider_class():
    """ComfyUI's ``CFGGuider`` subclass running DreamCache's combined guidance (built on first use).

    The guider's MODEL carries an injection restricted to ``guidance.REFERENCE_CHUNKS``; per step it runs
    ONE ``calc_cond_batch`` over [positive, negative, negative] = [e(I,T), e(I,0), e(0,0)] (ComfyUI batches
    the three chunks into one U-Net call when memory allows; the reference reaches chunks 0 and 1 only) and
    combines them with ``guidance.combined_guidance``. With a negative reference, a second injection puts it
    into chunk 2, so e(0,0) becomes e(N,0) (N the negative reference, steered away from). Predictions the scales make redundant are skipped
    unless the model options set ``disable_cfg1_optimization``. Post-CFG hooks on the model still run.
    """
    global _GUIDER_CLASS
    if _GUIDER_CLASS is not None:
        return _GUIDER_CLASS
    import comfy.samplers

    class DreamCacheCombinedGuider(comfy.samplers.CFGGuider):
        text_cfg = 7.5
        image_cfg = 5.0

        def set_cfg(self, text_cfg, image_cfg=None):
            self.text_cfg = float(text_cfg)
            self.image_cfg = float(text_cfg if image_cfg is None else image_cfg)
            self.cfg = self.text_cfg

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            positive = self.conds.get("positive", None)
            negative = self.conds.get("negative", None)
            optimise = not model_options.get("disable_cfg1_optimization", False)
            need = needed_predictions(self.text_cfg, self.image_cfg, optimise)
            conds = [None, None, None]
            conds[IMAGE_TEXT] = positive
            conds[IMAGE_ONLY] = negative if need[1] else None
            conds[UNCONDITIONAL] = negative if need[2] else None
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            e_image_text = out[IMAGE_TEXT]
            e_image = out[IMAGE_ONLY] if need[1] else None
            e_none = out[UNCONDITIONAL] if need[2] else None
            result = combined_guidance(e_none, e_image, e_image_text, self.text_cfg, self.image_cfg)
            baseline = e_none if e_none is not None else (e_image if e_image is not None else e_image_text)
            for fn in model_options.get("sampler_post_cfg_function", []):
                args = {"denoised": result, "cond": positive, "uncond": negative, "cond_scale": self.text_cfg,
                        "model": self.inner_model, "uncond_denoised": baseline, "cond_denoised": e_image_text,
                        "sigma": timestep, "model_options": model_options, "input": x}
                result = fn(args)
            return result

    _GUIDER_CLASS = DreamCacheCombinedGuider
    return _GUIDER_CLASS


def combined_guider(model_patcher, injection, positive, negative, text_cfg: float = 7.5, image_cfg: float = 5.0,
                    negative_injection=None):
    """A GUIDER for SamplerCustomAdvanced: a clone of ``model_patcher`` carrying ``injection`` (which must target
    ``guidance.REFERENCE_CHUNKS``), with DreamCache's combined guidance over ``positive``/``negative``;
    ``negative_injection`` (targeting ``guidance.UNCONDITIONAL`` only) puts a negative reference into e(0,0)."""
    text_cfg = check_number(text_cfg, "text_cfg", *GUIDANCE_SCALE_RANGE, advice="The authors use 7.5.")
    image_cfg = check_number(image_cfg, "image_cfg", *GUIDANCE_SCALE_RANGE, advice="The authors use 5.0.")

    if injection.chunks != frozenset(REFERENCE_CHUNKS):
        raise ValueError(f"The combined guider's injection must target chunks {REFERENCE_CHUNKS}, "
                         f"not {sorted(injection.chunks) if injection.chunks is not None else 'all'}.")
    patched = attach_injection(model_patcher.clone(), injection)
    if negative_injection is not None:
        if negative_injection.chunks != frozenset([UNCONDITIONAL]):
            raise ValueError(f"The combined guider's negative reference must target chunk {UNCONDITIONAL} only.")
        attach_injection(patched, negative_injection)
    guider = combined_guider_class()(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(text_cfg, image_cfg)
    return guider
