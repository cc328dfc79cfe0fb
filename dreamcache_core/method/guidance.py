"""Guidance arithmetic of DreamCache (the paper's joint and combined guidance), in plain torch.

With I = the reference injected, T = the prompt and 0 = neither:

    joint:     e = e(0,0) + s (e(I,T) - e(0,0))
    combined:  e = e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0))

The coefficients of both sum to one, so they apply unchanged to noise
predictions and to the denoised predictions ComfyUI's samplers combine.
With s_I = s_T = s the combined form is the joint one; with s_I = 1 it needs
no e(0,0).

The combined guider evaluates its predictions as ONE ``calc_cond_batch`` call
over three cond lists; the reference is injected into the chunks whose index
is in ``REFERENCE_CHUNKS``:
"""
from __future__ import annotations

from typing import Optional

import torch

IMAGE_TEXT = 0    # e(I,T): positive prompt, reference injected (index 0 = "positive", as in KSampler)
IMAGE_ONLY = 1    # e(I,0): negative prompt, reference injected
UNCONDITIONAL = 2  # e(0,0): negative prompt, no reference
REFERENCE_CHUNKS = (IMAGE_TEXT, IMAGE_ONLY)


def joint_guidance(e_none: torch.Tensor, e_image_text: torch.Tensor, scale: float) -> torch.Tensor:
    """e(0,0) + s (e(I,T) - e(0,0)), in the operation order of ComfyUI's cfg_function."""
    return e_none + (e_image_text - e_none) * scale


def combined_guidance(e_none: Optional[torch.Tensor], e_image: Optional[torch.Tensor], e_image_text: torch.Tensor,
                      text_cfg: float, image_cfg: float) -> torch.Tensor:
    """e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0)).

    ``e_image`` may be None when s_I == s_T (the joint form), ``e_none`` when s_I == 1, both when s_I = s_T = 1.
    """
    if e_image is None or e_none is None:
        needs_image, needs_none = needed_predictions(text_cfg, image_cfg)[1:]
        if (needs_image and e_image is None) or (needs_none and e_none is None):
            raise ValueError(f"text_cfg {text_cfg} and image_cfg {image_cfg} need e(I,0) and e(0,0).")
        if e_image is None and e_none is None:
            return e_image_text
        if e_image is None:
            return joint_guidance(e_none, e_image_text, text_cfg)
        return e_image + (e_image_text - e_image) * text_cfg
    return e_none + (e_image - e_none) * image_cfg + (e_image_text - e_image) * text_cfg


def needed_predictions(text_cfg: float, image_cfg: float, optimise: bool = True) -> tuple[bool, bool, bool]:
    """Which of (e(I,T), e(I,0), e(0,0)) the combined formula needs (``optimise`` False: all three)."""
    if not optimise:
        return True, True, True
    if image_cfg == text_cfg:
        return True, False, image_cfg != 1.0
    return True, True, image_cfg != 1.0
