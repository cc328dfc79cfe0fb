"""A training sample's images, made ready for the VAE: the target resized and centre-cropped, the
reference padded to a square on white (plain torch)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F



def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W, C] -> [size, size, C]: shorter side to ``size`` (antialiased bilinear), centre crop."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    planar = image.permute(2, 0, 1)[None].float()
    if (new_height, new_width) != (height, width):
        planar = F.interpolate(planar, size=(new_height, new_width), mode="bilinear", align_corners=False,
                               antialias=scale < 1).clamp(0, 1)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return planar[0, :, top:top + size, left:left + size].permute(1, 2, 0).contiguous()


def pad_to_square(image: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """[H, W, C] -> square, centred, padded with ``fill`` (white for references, 0 for masks)."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = torch.full((side, side, image.shape[2]), fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def prepare_reference(image: torch.Tensor, mask: Optional[torch.Tensor], size: int):
    """Reference [H, W, 3] (+ mask [H, W]) -> square ``size`` (padded with white / 0, then resized)."""
    square = resize_center_crop(pad_to_square(image, 1.0), size)
    if mask is None:
        return square, None
    if tuple(mask.shape) != tuple(image.shape[:2]):
        mask = F.interpolate(mask[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    square_mask = resize_center_crop(pad_to_square(mask[..., None], 0.0), size)[..., 0]
    return square, square_mask
