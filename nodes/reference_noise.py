"""ComfyUI node "Reference Noise (DreamCache)": a degraded copy of the reference, for a negative reference.

DreamCache has no image encoder: the degraded image goes through VAE Encode and Encode DreamCache like the real
reference, and that second cache is given to the guider's negative reference (the unconditional image branch of
combined guidance), so sampling steers away from "a blurry / noisy version of the subject".
"""
import torch
from comfy_api.v0_0_2 import io

from ..dreamcache_core.masking.reference_noise import MODES, SEED_MAX, check_mode, noised_reference
from .io_types import CATEGORY_REFERENCE
from .widget_checks import check_number_inputs, text_problem, validation_result, widget_problems

MODE_TOOLTIP = ("How the reference is degraded. gaussian: random noise added to every pixel; shuffle: pixels trade "
                "places (colours kept, shapes lost); fade: blended toward mid-grey; blur: gaussian blur (sigma up to "
                "5 % of the shorter side).")


class DreamCacheReferenceNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheReferenceNoise",
            display_name="Reference Noise (DreamCache)",
            category=CATEGORY_REFERENCE,
            description="Makes a NEGATIVE reference: a degraded copy (noised, shuffled, faded or blurred) of the "
                        "subject photo. Encode it like the reference (VAE Encode, then Encode DreamCache) and give "
                        "that cache to the guider's negative reference, so sampling steers away from a blurry or "
                        "noisy version of the subject. The alpha channel is kept; a mask limits the change.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image, typically the output of Mask Reference (the "
                                                "subject on white) that also feeds the positive cache."),
                io.Combo.Input("mode", options=list(MODES), default="gaussian", tooltip=MODE_TOOLTIP),
                io.Float.Input("strength", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="How strongly the image is degraded: 0 gives the image unchanged, 1 the "
                                       "strongest (noise of standard deviation 1, every pixel shuffled, plain grey, "
                                       "or the widest blur)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the noise and of the shuffle (fade and blur use none). The same seed "
                                     "gives the same image on every device; set 'control after generate' to fixed "
                                     "so the negative cache is encoded once."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Limits the change to where the mask is above 0 (a soft mask blends "
                                      "proportionally; elsewhere the image is kept bit for bit); shuffle then moves "
                                      "pixels only inside the mask. Must have the image's size."),
            ],
            outputs=[
                io.Image.Output(display_name="image",
                                tooltip="The degraded reference, same size: for VAE Encode, then Encode DreamCache, "
                                        "then the guider's negative reference."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode=None, strength=None, seed=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"strength": strength, "seed": seed})
        problems.append(text_problem(check_mode, mode, "mode"))
        return validation_result(problems)

    @classmethod
    def execute(cls, image, mode, strength, seed, mask=None):
        check_number_inputs(cls, {"strength": strength, "seed": seed})
        if isinstance(image, torch.Tensor) and image.ndim == 3:
            image = image.unsqueeze(0)
        progress = None
        if mode == "blur":  # the slow mode on large photos: one step per image of the batch
            import comfy.utils

            bar = comfy.utils.ProgressBar(max(1, len(image)))
            progress = lambda done, total: bar.update_absolute(done, total)  # noqa: E731
        return io.NodeOutput(noised_reference(image, mode, strength, seed, mask, progress))


NODES = [DreamCacheReferenceNoise]
