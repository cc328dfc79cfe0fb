"""References for headless generation: a photo made ready for Encode as Mask Reference makes it (the subject
cut out by a mask, the image's transparency or SAM, centred on white), and its cache encoded through the pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..comfy_bridge.pipeline import Pipeline
from ..comfy_bridge import encode_reference
from ..masking.reference_mask import DEFAULT_MARGIN, as_mask_batch, cut_subjects_on_white, image_alpha, image_to_rgb


@dataclass
class Reference:
    """A prepared reference: the image given to Encode (subject on white) and its mask (None: unmasked)."""

    image: torch.Tensor  # [1, S, S, 3]
    mask: Optional[torch.Tensor]  # [1, S, S] or None
    mask_source: str  # "mask file", "transparency", "sam", "none"
    source: Optional[str] = None


def prepare_reference(image: torch.Tensor, size: int, mask: Optional[torch.Tensor] = None,
                      segmenter: Optional[Callable] = None, allow_unmasked: bool = True,
                      margin: Optional[float] = None, source: Optional[str] = None) -> Reference:
    """What Mask Reference does: the subject (mask > transparency > SAM) centred on a white size x size square.

    Without any of them the reference is only resized to a square (unmasked), or refused when
    ``allow_unmasked`` is False.
    """
    margin = DEFAULT_MARGIN if margin is None else margin
    if image.ndim == 3:
        image = image.unsqueeze(0)
    alpha = image_alpha(image)
    if mask is not None:
        subject, how = as_mask_batch(mask), "mask file"
    elif alpha is not None:
        subject, how = alpha, "transparency"
    elif segmenter is not None:
        subject, how = torch.stack([segmenter(image_to_rgb(i)) for i in image]), "sam"
    else:
        if not allow_unmasked:
            raise ValueError("The reference must be masked (the paper caches the subject on white): give --sam "
                             "with a SAM checkpoint, a mask (--reference-mask / --reference-masks), or an image with "
                             "transparency; or pass --unmasked-references to use the whole image.")
        rgb = image_to_rgb(image).permute(0, 3, 1, 2)
        side = min(rgb.shape[-2:])
        top, left = (rgb.shape[-2] - side) // 2, (rgb.shape[-1] - side) // 2
        square = rgb[..., top:top + side, left:left + side]
        resized = torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", antialias=True,
                                                  align_corners=False).clamp(0, 1)
        return Reference(resized.permute(0, 2, 3, 1).contiguous(), None, "none", source)
    cut, cut_mask = cut_subjects_on_white(image, subject, size, margin)
    return Reference(cut, cut_mask, how, source)


def encode_cache(pipeline: Pipeline, reference: Reference, encode_conditioning, seed: int, token_mask: bool = True):
    """Encode DreamCache on the prepared reference (the mask, when there is one, drops background tokens)."""
    latent = pipeline.encode_image(reference.image)
    mask = reference.mask if (token_mask and reference.mask is not None) else None
    return encode_reference(pipeline.model, latent, encode_conditioning, seed, mask)
