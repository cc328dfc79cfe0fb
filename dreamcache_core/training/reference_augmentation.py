"""Online reference augmentation as the DreamCache authors trained (plain torch, explicit generators).

The authors' loader (``ldm/data/gen_dataset.py`` of their repository) makes the
reference from the subject's photo and mask each time a sample is drawn:

1. background set to white (pixels outside the mask);
2. crop to the subject's bounding box;
3. ``RandomResizeForeground(512, min_pct_area=0.7)``: the crop's width is drawn
   uniformly in [0.7 S, S], its height follows the aspect ratio and both are
   clipped to the S x S canvas, so the subject's longer side always spans at
   least 70 % of the reference and the whole subject stays in frame; it is pasted
   at a uniformly random position on a white square;
4. horizontal flip with p 0.5;
5. colour jitter (brightness 0.2, contrast 0.2, saturation 0.2, hue 0.05, in a
   random order) with p 0.1;
6. random erasing with p 0.4 (area 2-25 % of the image, aspect 0.3-3.3, filled
   white), as torchvision's ``RandomErasing`` draws it;

and replaces the caption by the empty one with p 0.07 (here: the trainer's
caption dropout, whose default becomes 0.07 with ``--augment authors``).

Two deliberate differences, both because the authors' exact effect is not
what they describe: the authors' ``min_pct_area`` bounds the subject's *side*
(the code draws a width), which is what is reproduced here; and their jitter
ran on the reference already normalised to [-1, 1] (so torchvision's clamp to
[0, 1] turned the dark half of the image grey) over the whole square, while here it
runs on the 0..1 image and on the subject only, so the background stays the pure
white every reference has at inference (Mask Reference puts subjects on white).

Every random number comes from the ``torch.Generator`` passed in (the trainer's
counter-based ones, keyed on seed and draw number), never from global state:
the same generator state gives the same reference bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .training_manifest import UnusableRow

AUGMENT_MODES = ("authors", "none")
FOREGROUND = 0.5       # mask values at or above this are subject
UNIFORMS_PER_DRAW = 64  # uniforms drawn per reference, whatever is applied (so the draw count never varies)
ERASE_ATTEMPTS = 10     # torchvision's RandomErasing tries this many boxes before giving up


class UnusableReference(UnusableRow):
    """The reference cannot be augmented (its mask marks no subject)."""


@dataclass(frozen=True)
class AuthorsAugmentation:
    """The authors' settings (see the module docstring)."""

    min_side_fraction: float = 0.7          # RandomResizeForeground's min_pct_area (their code bounds the side)
    flip_p: float = 0.5
    jitter_p: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    erase_p: float = 0.4
    erase_scale: tuple = (0.02, 0.25)        # erased area as a fraction of the image
    erase_ratio: tuple = (0.3, 3.3)          # erased box aspect ratio (torchvision's default)
    empty_caption_p: float = 0.07            # the caption dropout these settings ask for

    def __post_init__(self):
        if not 0.0 < self.min_side_fraction <= 1.0:
            raise ValueError(f"min_side_fraction must lie in (0, 1], got {self.min_side_fraction}.")
        for name in ("flip_p", "jitter_p", "erase_p", "empty_caption_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")

    def describe(self) -> dict:
        return {"augment": "authors", "min_side_fraction": self.min_side_fraction, "flip_p": self.flip_p,
                "jitter_p": self.jitter_p, "erase_p": self.erase_p, "erase_scale": list(self.erase_scale)}


@dataclass(frozen=True)
class AugmentationRecord:
    """What one augmentation did (for tests and inspection)."""

    box: tuple                      # (top, left, height, width) of the pasted subject crop
    flipped: bool
    jitter: Optional[tuple]         # (brightness, contrast, saturation, hue, order) when jittered
    erased: Optional[tuple]         # (top, left, height, width) of the white box when erased


def augmentation_settings(mode: Optional[str]) -> Optional[AuthorsAugmentation]:
    """``"authors"`` -> the authors' settings, ``"none"`` / None -> None."""
    if mode in (None, "none"):
        return None
    if mode == "authors":
        return AuthorsAugmentation()
    raise ValueError(f"Unknown --augment {mode!r}; use one of {', '.join(AUGMENT_MODES)}.")


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------

def subject_crop(image: torch.Tensor, mask: Optional[torch.Tensor]):
    """White background + crop to the subject's bounding box: (image [h, w, 3], mask [h, w]).

    ``mask`` None means the whole image is the subject. Raises ``UnusableReference`` for an empty mask.
    """
    image = image[..., :3].float()
    if mask is None:
        mask = torch.ones(image.shape[:2])
    mask = mask.float()
    if tuple(mask.shape) != tuple(image.shape[:2]):
        mask = F.interpolate(mask[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    subject = mask >= FOREGROUND
    rows = torch.nonzero(subject.any(dim=1)).flatten()
    if rows.numel() == 0:
        raise UnusableReference("the reference mask marks no subject (no pixel at or above 0.5)")
    cols = torch.nonzero(subject.any(dim=0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    inside = subject[top:bottom, left:right]
    crop = image[top:bottom, left:right]
    return torch.where(inside[..., None], crop, 1.0).contiguous(), inside.float()


def foreground_size(width: int, height: int, size: int, u: float, min_side_fraction: float) -> tuple:
    """(width, height) of the resized crop, as RandomResizeForeground picks them from one uniform ``u``."""
    low = int(min_side_fraction * size)
    new_width = low + min(int(u * (size + 1 - low)), size - low)
    aspect = width / height
    new_height = int(new_width / aspect)
    if new_height > size:
        new_height = size
        new_width = int(new_height * aspect)
    if new_width > size:
        new_width = size
        new_height = int(new_width / aspect)
    return max(1, new_width), max(1, new_height)


def _resize(plane: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, H, W] -> [C, height, width] (bilinear, antialiased when shrinking)."""
    if tuple(plane.shape[-2:]) == (height, width):
        return plane
    shrink = height < plane.shape[-2] or width < plane.shape[-1]
    return F.interpolate(plane[None], size=(height, width), mode="bilinear", align_corners=False,
                         antialias=shrink)[0].clamp(0, 1)


def paste_on_white(crop: torch.Tensor, crop_mask: torch.Tensor, size: int, box: tuple):
    """The crop resized to ``box`` = (top, left, height, width) on a white ``size`` square (mask 0 around it)."""
    top, left, height, width = box
    planes = _resize(torch.cat([crop.permute(2, 0, 1), crop_mask[None]]), height, width)
    image = torch.ones(3, size, size)
    mask = torch.zeros(size, size)
    image[:, top:top + height, left:left + width] = planes[:3]
    mask[top:top + height, left:left + width] = planes[3]
    return image, mask


def _grey(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> [H, W] luma (ITU-R 601-2, as torchvision's rgb_to_grayscale)."""
    return 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]


def _shift_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """[3, H, W] in 0..1 with its hue turned by ``shift`` (fraction of the circle), through HSV."""
    r, g, b = image
    value, _ = image.max(dim=0)
    low, _ = image.min(dim=0)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    sector = hue * 6
    k = lambda n: (n + sector) % 6  # noqa: E731
    channel = lambda n: value - value * saturation * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([channel(5), channel(3), channel(1)])


def colour_jitter(image: torch.Tensor, mask: torch.Tensor, factors: tuple, order: tuple) -> torch.Tensor:
    """Brightness, contrast, saturation and hue (``factors``) applied to the subject in ``order`` (0..3)."""
    brightness, contrast, saturation, hue = factors
    out = image
    weight = mask[None]
    for step in order:
        if step == 0:
            out = (out * brightness).clamp(0, 1)
        elif step == 1:
            mean = (_grey(out) * mask).sum() / mask.sum().clamp_min(1e-6)
            out = (out * contrast + mean * (1 - contrast)).clamp(0, 1)
        elif step == 2:
            out = (out * saturation + _grey(out)[None] * (1 - saturation)).clamp(0, 1)
        else:
            out = _shift_hue(out, hue).clamp(0, 1)
    return out * weight + image * (1 - weight)


def erase_box(height: int, width: int, u: list, settings: AuthorsAugmentation) -> Optional[tuple]:
    """torchvision RandomErasing's box from uniforms ``u`` (4 per attempt), or None when no attempt fits."""
    area = height * width
    low_ratio, high_ratio = math.log(settings.erase_ratio[0]), math.log(settings.erase_ratio[1])
    low_scale, high_scale = settings.erase_scale
    for attempt in range(ERASE_ATTEMPTS):
        a, b, c, d = u[4 * attempt:4 * attempt + 4]
        erase_area = area * (low_scale + (high_scale - low_scale) * a)
        ratio = math.exp(low_ratio + (high_ratio - low_ratio) * b)
        h = int(round(math.sqrt(erase_area * ratio)))
        w = int(round(math.sqrt(erase_area / ratio)))
        if not (h < height and w < width):
            continue
        top = min(int(c * (height - h + 1)), height - h)
        left = min(int(d * (width - w + 1)), width - w)
        return top, left, h, w
    return None


# --------------------------------------------------------------------------
# The whole augmentation
# --------------------------------------------------------------------------

def augment_reference(image: torch.Tensor, mask: Optional[torch.Tensor], size: int, generator: torch.Generator,
                      settings: AuthorsAugmentation = AuthorsAugmentation()):
    """The authors' augmentation of one reference: (image [size, size, 3], mask [size, size], AugmentationRecord).

    ``image`` [H, W, 3] in 0..1, ``mask`` [H, W] (1 = subject; None = the whole image). Draws exactly
    ``UNIFORMS_PER_DRAW`` uniforms from ``generator``.
    """
    crop, crop_mask = subject_crop(image, mask)
    u = torch.rand(UNIFORMS_PER_DRAW, generator=generator, dtype=torch.float64).tolist()
    height, width = crop.shape[:2]
    new_width, new_height = foreground_size(width, height, size, u[0], settings.min_side_fraction)
    left = min(int(u[1] * (size - new_width + 1)), size - new_width)
    top = min(int(u[2] * (size - new_height + 1)), size - new_height)
    box = (top, left, new_height, new_width)
    out, out_mask = paste_on_white(crop, crop_mask, size, box)
    flipped = u[3] < settings.flip_p
    if flipped:
        out, out_mask = out.flip(-1), out_mask.flip(-1)
    jitter = None
    if u[4] < settings.jitter_p:
        factors = (1 + settings.brightness * (2 * u[5] - 1), 1 + settings.contrast * (2 * u[6] - 1),
                   1 + settings.saturation * (2 * u[7] - 1), settings.hue * (2 * u[8] - 1))
        order = tuple(int(i) for i in torch.tensor(u[9:13]).argsort().tolist())
        out = colour_jitter(out, out_mask, factors, order)
        jitter = factors + (order,)
    erased = None
    if u[13] < settings.erase_p:
        erased = erase_box(size, size, u[14:14 + 4 * ERASE_ATTEMPTS], settings)
        if erased is not None:
            e_top, e_left, e_height, e_width = erased
            out[:, e_top:e_top + e_height, e_left:e_left + e_width] = 1.0
            out_mask[e_top:e_top + e_height, e_left:e_left + e_width] = 0.0
    record = AugmentationRecord(box, flipped, jitter, erased)
    return out.permute(1, 2, 0).contiguous(), out_mask.contiguous(), record


def canonical_reference(image: torch.Tensor, mask: Optional[torch.Tensor], size: int):
    """The reference without randomness (validation, held-out checks): the subject on white, cropped to it and
    scaled so its longer side fills ``size``, centred. Returns (image [size, size, 3], mask [size, size])."""
    crop, crop_mask = subject_crop(image, mask)
    height, width = crop.shape[:2]
    scale = size / max(height, width)
    new_height, new_width = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
    box = ((size - new_height) // 2, (size - new_width) // 2, new_height, new_width)
    out, out_mask = paste_on_white(crop, crop_mask, size, box)
    return out.permute(1, 2, 0).contiguous(), out_mask.contiguous()
