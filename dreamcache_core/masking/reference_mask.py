"""Turn a photo and a subject mask into a DreamCache reference.

DreamCache caches *masked* references: the subject alone, on a white
background, so that no background leaks into the cached features.  This module
does that cut-out in plain torch (no ComfyUI import):

* ``image_to_rgb`` / ``image_alpha`` / ``as_mask_batch`` / ``resize_mask``
  bring ComfyUI's IMAGE (``[B, H, W, C]``, float 0..1) and MASK (``[B, H, W]``
  or ``[H, W]``, float 0..1, 1 = subject) into a common form.
* ``cut_subject_on_white`` composites one subject over white, crops a square
  centred on it with a margin, pads with white where that square leaves the
  photo and resizes it to ``size x size``; ``cut_subjects_on_white`` does the
  same for a batch.  The crop position (``CROP_POSITIONS``) says how a subject
  that is not square is fitted: "pad" (default) keeps all of it, the others
  fill the square with it and cut off part of its long side.
* ``find_salient_subject`` / ``central_salient_box`` choose a prompt (a box
  and a point) for the most salient central object without any model, and
  ``pick_best_mask`` chooses among SAM's candidate masks.  The SAM side lives in
  ``sam_segmenter``.

Conventions
-----------
* Channels: 1 = grey (repeated to RGB), 2 = grey + alpha, 3 = RGB,
  4 = RGBA (the first three channels are the colour).  An alpha channel is
  *not* applied by ``image_to_rgb``; ``image_alpha`` returns it so the caller
  can use it as the subject mask when no other mask is given (this is what the
  Mask Reference node does: explicit mask > transparency > SAM).
* A pixel belongs to the subject when its mask value is at least
  ``FOREGROUND_THRESHOLD`` (0.5): that decides the bounding box and whether a
  mask is empty.  Compositing uses the soft value itself.
* Boxes are ``Box(left, top, right, bottom)`` in pixels, right and bottom
  exclusive, i.e. pixel-edge coordinates; ``Box.xyxy`` is the same as the
  ``x0, y0, x1, y1`` array SAM expects.
* Batches: each image is processed with its own mask; a batch of one (image or
  mask) is broadcast against the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

#: Mask value from which a pixel counts as subject (bounding box, emptiness).
FOREGROUND_THRESHOLD = 0.5
#: Default free space around the subject, as a fraction of its longest side,
#: on each side of the square crop (0.1: the subject spans 1 / 1.2 of it).
DEFAULT_MARGIN = 0.1
#: How a subject that is not square fills the square: "pad" keeps the whole
#: subject (side = its longest side, white on the short side); the others use
#: its shortest side, so it fills the square, and cut off the part of the long
#: side that does not fit: "center" keeps the middle, "top"/"bottom" that end
#: of a tall subject, "left"/"right" that end of a wide one.  A direction
#: across the long axis ("top" on a wide subject) cuts as "center" does.
CROP_POSITIONS = ("pad", "center", "top", "bottom", "left", "right")
DEFAULT_CROP_POSITION = "pad"
#: Longest side of the thumbnail the saliency search works on.
SALIENCY_WORKING_SIZE = 128
#: Smallest colour distance to the background (RGB Euclidean / sqrt(3), so
#: 0..1) that can count as a subject; below it the image is taken as uniform.
MIN_SUBJECT_CONTRAST = 0.08
#: An alpha channel whose smallest value is above this is fully opaque.
OPAQUE_ALPHA = 1.0 - 0.5 / 255.0


class Box(NamedTuple):
    """A pixel rectangle; ``right`` and ``bottom`` are exclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def centre(self) -> Tuple[float, float]:
        """``(x, y)`` of the box centre, in pixel-edge coordinates."""
        return ((self.left + self.right) / 2.0, (self.top + self.bottom) / 2.0)

    @property
    def xyxy(self) -> np.ndarray:
        """The box as SAM's ``[x0, y0, x1, y1]`` float array."""
        return np.array([self.left, self.top, self.right, self.bottom], dtype=np.float32)


@dataclass(frozen=True)
class SubjectPrompt:
    """Where the automatic search thinks the subject is.

    ``box`` encloses it, ``point`` (``(x, y)`` in pixels) lies on it, and
    ``found`` is False when the image had no region that stands out from its
    border colour: then the box is the central 80 % and the point the centre.
    """

    box: Box
    point: Tuple[float, float]
    found: bool


class EmptyMaskError(ValueError):
    """The mask marks no pixel as subject."""


# --------------------------------------------------------------------------
# Bringing ComfyUI images and masks into one form
# --------------------------------------------------------------------------

def image_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Return the colour of a channel-last image as 3 channels.

    ``image`` is ``[..., H, W, C]`` with C = 1 (grey), 2 (grey + alpha),
    3 (RGB) or 4 (RGBA).  Grey is repeated (as a view, without copying); alpha
    is dropped (see ``image_alpha``).  The result is float, same device.
    """
    if image.ndim < 3:
        raise ValueError(
            f"Expected an image shaped [batch, height, width, channels] or [height, width, channels], "
            f"got shape {tuple(image.shape)}."
        )
    channels = image.shape[-1]
    if not image.is_floating_point():
        raise ValueError(f"Expected a float image in 0..1, got dtype {image.dtype}.")
    if channels in (1, 2):
        return image[..., :1].expand(*image.shape[:-1], 3)
    if channels in (3, 4):
        return image[..., :3]
    raise ValueError(
        f"The image has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA). "
        "Convert it to RGB first."
    )


def image_alpha(image: torch.Tensor) -> Optional[torch.Tensor]:
    """The alpha channel of a grey+alpha or RGBA image (``[..., H, W]``), else None.

    Returns None as well when the alpha is fully opaque everywhere, since it
    then says nothing about where the subject is.
    """
    if image.ndim < 3 or image.shape[-1] not in (2, 4):
        return None
    alpha = image[..., -1]
    if float(alpha.min()) > OPAQUE_ALPHA:
        return None
    return alpha


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """Return a MASK as float ``[B, H, W]``, clamped to 0..1.

    Accepts ``[H, W]``, ``[B, H, W]`` and ``[B, 1, H, W]``/``[B, H, W, 1]``.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise ValueError(
            f"Expected a mask shaped [batch, height, width] or [height, width], got shape {tuple(mask.shape)}."
        )
    return mask.float().clamp(0.0, 1.0)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[H, W]`` or ``[B, H, W]`` mask(s) to ``height x width``.

    Bilinear, antialiased when shrinking, so a soft edge stays soft and an
    all-zero area stays exactly zero.  Returns the input when sizes match.
    """
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    squeeze = mask.ndim == 2
    batch = as_mask_batch(mask).unsqueeze(1)
    shrinking = height < batch.shape[-2] or width < batch.shape[-1]
    resized = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    resized = resized[:, 0].clamp(0.0, 1.0)
    return resized[0] if squeeze else resized


def mask_bounding_box(mask: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> Optional[Box]:
    """The smallest box holding every pixel of ``mask`` (``[H, W]``) at or above ``threshold``.

    Returns None when there is no such pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f"Expected one mask shaped [height, width], got shape {tuple(mask.shape)}.")
    foreground = mask >= threshold
    rows = torch.nonzero(foreground.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    columns = torch.nonzero(foreground.any(dim=0)).flatten()
    return Box(int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1)


def mask_is_empty(mask: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> bool:
    """True when no pixel of ``mask`` reaches ``threshold``."""
    return not bool((mask >= threshold).any())


# --------------------------------------------------------------------------
# Cutting the subject out onto a white square
# --------------------------------------------------------------------------

def check_crop_position(position: str) -> str:
    """Return ``position`` if it is one of ``CROP_POSITIONS``, else raise a ValueError naming them."""
    if not isinstance(position, str) or position not in CROP_POSITIONS:
        raise ValueError(
            f"The crop position is {position!r}, which is not a crop position. Choose one of "
            f"{', '.join(repr(name) for name in CROP_POSITIONS)}."
        )
    return position


def _square_start(start: int, length: int, side: int, margin_px: int, keep: str) -> int:
    """Where a square of ``side`` starts on one axis holding the subject span ``[start, start + length)``.

    ``keep`` is "center", "start" or "end".  A side at least ``length`` holds
    the whole span, centred (to the nearest pixel, any odd pixel after it);
    a shorter side cuts the span: "center" keeps its middle (the odd pixel cut
    before it), "start"/"end" keep that end with ``margin_px`` of space beyond it.
    """
    if side >= length or keep == "center":
        return start - (side - length) // 2
    if keep == "start":
        return start - margin_px
    return start + length + margin_px - side


def subject_square(subject: Box, margin: float, position: str = DEFAULT_CROP_POSITION) -> Box:
    """The square crop around ``subject``; it may extend beyond the image.

    "pad" (the default): its longest side plus ``ceil(margin * longest)`` on
    each side, centred on the subject (to the nearest pixel), so the whole
    subject fits.  Any other of ``CROP_POSITIONS``: its *shortest* side plus
    ``ceil(margin * shortest)`` on each side, so the subject fills the square;
    across the short axis it is centred as for "pad", along the long axis the
    part that does not fit is cut: "center" keeps the middle, "top"/"bottom"
    keep that end of a tall subject and "left"/"right" that end of a wide one
    (with the margin beyond the kept edge).  A direction that does not apply
    ("top"/"bottom" on a wide subject, "left"/"right" on a tall one) cuts as
    "center" does; a square subject gets the same square for every position,
    and so does a subject whose long side fits in the square with its margin
    (nothing to cut: it is centred).
    """
    check_crop_position(position)
    width, height = subject.width, subject.height
    reference = max(width, height) if position == "pad" else min(width, height)
    margin_px = int(math.ceil(margin * reference))
    side = reference + 2 * margin_px
    keep_x = {"left": "start", "right": "end"}.get(position, "center") if width > height else "center"
    keep_y = {"top": "start", "bottom": "end"}.get(position, "center") if height > width else "center"
    left = _square_start(subject.left, width, side, margin_px, keep_x)
    top = _square_start(subject.top, height, side, margin_px, keep_y)
    return Box(left, top, left + side, top + side)


def _resize_square_plane(plane: torch.Tensor, size: int) -> torch.Tensor:
    """Resize one square ``[S, S]`` plane to ``[size, size]`` (bilinear, antialiased)."""
    if plane.shape[-1] == size:
        return plane
    return F.interpolate(plane[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]


def cut_subject_on_white(
    image_rgb: torch.Tensor,
    mask: torch.Tensor,
    size: int,
    margin: float = DEFAULT_MARGIN,
    position: str = DEFAULT_CROP_POSITION,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut the subject out of one image onto a white ``size x size`` square.

    Args:
        image_rgb: ``[H, W, 3]`` float in 0..1.
        mask: ``[H, W]`` float in 0..1, 1 = subject; soft values blend.
        size: side of the output square in pixels.
        margin: free space around the subject on each side, as a fraction of
            the subject's longest side ("pad") or shortest side (the others).
        position: one of ``CROP_POSITIONS`` (see ``subject_square``): "pad"
            keeps the whole subject, the others fill the square with it and
            cut off part of its long side.

    Returns:
        ``(image [size, size, 3], mask [size, size])``, float32 on the input's
        device.  The subject's bounding box (for "pad"; else the part of it
        that is kept) is centred and the mask follows the same crop; pixels
        whose output mask is 0 are exactly white (1.0), solid subject has a mask of exactly
        1.0, and the image is ``subject * mask + white * (1 - mask)`` at every
        pixel.

    The blend is done premultiplied (``colour * mask`` and ``mask`` are
    resampled, then white is added where the mask is not), so no background
    colour fringes the edge.  Work happens one channel at a time on the crop
    only, so a 4096 px photo costs about one extra float plane of memory, and a
    16 px one is simply upscaled.

    Raises:
        EmptyMaskError (a ValueError) when no mask pixel reaches 0.5.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
        raise ValueError(f"Expected one RGB image shaped [height, width, 3], got shape {tuple(image_rgb.shape)}.")
    if mask.ndim != 2 or tuple(mask.shape) != tuple(image_rgb.shape[:2]):
        raise ValueError(
            f"The mask ({tuple(mask.shape)}) must be [height, width] of the image ({tuple(image_rgb.shape[:2])}); "
            "resize it with resize_mask first."
        )
    if int(size) < 1:
        raise ValueError(f"The output size must be at least 1 pixel, got {size}.")
    if not margin >= 0:
        raise ValueError(f"The margin must be 0 or more, got {margin}.")
    check_crop_position(position)
    size = int(size)

    subject = mask_bounding_box(mask)
    if subject is None:
        raise EmptyMaskError(
            f"The mask is empty: no pixel is {FOREGROUND_THRESHOLD} or more (its largest value is "
            f"{float(mask.max()) if mask.numel() else 0.0:.2f}), so there is no subject to cut out. "
            "Draw the subject in white on the mask (e.g. right-click the Load Image node > Open in MaskEditor), "
            "choose a mask in which white marks the subject, or invert one that marks the background."
        )

    height, width = mask.shape
    square = subject_square(subject, margin, position)
    # The part of the square that lies on the image.
    top, bottom = max(square.top, 0), min(square.bottom, height)
    left, right = max(square.left, 0), min(square.right, width)

    # One square plane, reused: zeros outside the image are white once the
    # premultiplied colour and the mask are composited.
    square_plane = torch.zeros((square.height, square.width), dtype=torch.float32, device=image_rgb.device)
    on_image = square_plane[top - square.top:bottom - square.top, left - square.left:right - square.left]

    on_image.copy_(mask[top:bottom, left:right]).clamp_(0.0, 1.0)
    out_mask = _resize_square_plane(square_plane, size).clamp(0.0, 1.0)
    # Resampling weights sum to 1 only up to rounding: keep solid subject solid.
    out_mask[out_mask > 1.0 - 1e-5] = 1.0
    crop_mask = on_image.clone()

    out_image = torch.empty((size, size, 3), dtype=torch.float32, device=image_rgb.device)
    for channel in range(3):
        on_image.copy_(image_rgb[top:bottom, left:right, channel]).clamp_(0.0, 1.0).mul_(crop_mask)
        premultiplied = _resize_square_plane(square_plane, size)
        out_image[..., channel] = (premultiplied + (1.0 - out_mask)).clamp(0.0, 1.0)
    return out_image, out_mask


def cut_subjects_on_white(
    images: torch.Tensor,
    masks: torch.Tensor,
    size: int,
    margin: float = DEFAULT_MARGIN,
    position: str = DEFAULT_CROP_POSITION,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cut_subject_on_white`` for a ComfyUI batch.

    Args:
        images: IMAGE ``[B, H, W, C]`` (C = 1, 2, 3 or 4; colour is used, see
            ``image_to_rgb``) or one ``[H, W, C]`` image.
        masks: MASK ``[B, h, w]`` or ``[h, w]``; resized to the image size
            when it differs.
        size, margin, position: as in ``cut_subject_on_white``.

    Each image is cut with its own mask; a batch of one image or one mask is
    broadcast against the other.  Returns ``(images [N, size, size, 3],
    masks [N, size, size])``.

    Raises:
        ValueError when the batch sizes cannot be paired, EmptyMaskError
        naming the image whose mask is empty.
    """
    check_crop_position(position)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"Expected an image batch shaped [batch, height, width, channels], got shape {tuple(images.shape)}.")
    images_rgb = image_to_rgb(images)
    masks = as_mask_batch(masks)
    height, width = images_rgb.shape[1:3]
    if tuple(masks.shape[1:]) != (height, width):
        masks = resize_mask(masks, height, width)

    image_count, mask_count = images_rgb.shape[0], masks.shape[0]
    if image_count != mask_count and 1 not in (image_count, mask_count):
        raise ValueError(
            f"There are {image_count} images but {mask_count} masks. Give one mask per image, "
            "or a single mask (used for every image), or a single image (cut once per mask)."
        )
    count = max(image_count, mask_count)

    out_images, out_masks = [], []
    for index in range(count):
        image = images_rgb[index if image_count > 1 else 0]
        mask = masks[index if mask_count > 1 else 0]
        try:
            out_image, out_mask = cut_subject_on_white(image, mask, size, margin, position)
        except EmptyMaskError as error:
            raise EmptyMaskError(f"Image {index + 1} of {count}: {error}") from None
        out_images.append(out_image)
        out_masks.append(out_mask)
    return torch.stack(out_images), torch.stack(out_masks)


# --------------------------------------------------------------------------
# Choosing a SAM prompt without a model
# --------------------------------------------------------------------------

def _saliency_thumbnail(image_rgb: torch.Tensor) -> torch.Tensor:
    """``image_rgb`` shrunk (area average) to fit ``SALIENCY_WORKING_SIZE``."""
    height, width = image_rgb.shape[:2]
    scale = min(1.0, SALIENCY_WORKING_SIZE / max(height, width))
    if scale >= 1.0:
        return image_rgb.float()
    small_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    planar = image_rgb.float().permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(planar, size=small_size, mode="area")[0].permute(1, 2, 0)


def _border_colour(image_rgb: torch.Tensor) -> torch.Tensor:
    """Per-channel median colour of a band ~3 % wide along the image border."""
    height, width = image_rgb.shape[:2]
    band = max(1, round(0.03 * min(height, width)))
    border = torch.cat([
        image_rgb[:band].reshape(-1, 3),
        image_rgb[-band:].reshape(-1, 3),
        image_rgb[:, :band].reshape(-1, 3),
        image_rgb[:, -band:].reshape(-1, 3),
    ])
    return border.median(dim=0).values


def _otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (the cut that best separates two classes)."""
    values = values.flatten().float()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    histogram = torch.histc(values, bins=bins, min=low, max=high).double()
    centres = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    weight_below = torch.cumsum(histogram, 0)
    weight_above = weight_below[-1] - weight_below
    sum_below = torch.cumsum(histogram * centres, 0)
    mean_below = sum_below / weight_below.clamp_min(1e-12)
    mean_above = (sum_below[-1] - sum_below) / weight_above.clamp_min(1e-12)
    between_class = weight_below * weight_above * (mean_below - mean_above) ** 2
    best = int(torch.argmax(between_class[:-1]))
    return float(centres[best] + (centres[1] - centres[0]) / 2)


def _grow_region(seed: Tuple[int, int], allowed: torch.Tensor) -> torch.Tensor:
    """The 8-connected part of ``allowed`` ([h, w] bool) that holds ``seed`` (row, column)."""
    allowed_f = allowed.float()[None, None]
    region = torch.zeros_like(allowed_f)
    region[0, 0, seed[0], seed[1]] = 1.0
    while True:
        grown = F.max_pool2d(region, kernel_size=3, stride=1, padding=1) * allowed_f
        if torch.equal(grown, region):
            return region[0, 0] > 0
        region = grown


def find_salient_subject(image_rgb: torch.Tensor) -> SubjectPrompt:
    """Find the most salient central object of ``image_rgb`` (``[H, W, 3]``, 0..1) without a model.

    Deterministic recipe, on a thumbnail of at most 128 px:

    1. background colour = median colour of the image border;
    2. saliency = colour distance to it (0..1); pixels above Otsu's
       threshold (at least ``MIN_SUBJECT_CONTRAST``) are foreground;
    3. seed = the foreground pixel maximising the locally averaged saliency
       times a centred Gaussian (so big, central, contrasting regions win);
    4. subject = the seed's connected foreground region (gaps of one
       thumbnail pixel are bridged); the box encloses it with 3 % padding, the
       point is its pixel nearest its centroid.

    Works best for the typical reference: one object on a plain or white
    background.  Without any contrasting region ``found`` is False and the
    central 80 % of the image is returned.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
        raise ValueError(f"Expected one RGB image shaped [height, width, 3], got shape {tuple(image_rgb.shape)}.")
    height, width = image_rgb.shape[:2]
    thumbnail = _saliency_thumbnail(image_rgb.detach().cpu()).clamp(0.0, 1.0)
    small_height, small_width = thumbnail.shape[:2]
    scale_x, scale_y = width / small_width, height / small_height

    saliency = (thumbnail - _border_colour(thumbnail)).norm(dim=-1) / math.sqrt(3.0)
    if float(saliency.max()) < MIN_SUBJECT_CONTRAST:
        return SubjectPrompt(
            box=Box(round(0.1 * width), round(0.1 * height), round(0.9 * width), round(0.9 * height)),
            point=(width / 2.0, height / 2.0),
            found=False,
        )
    foreground = saliency >= max(_otsu_threshold(saliency), MIN_SUBJECT_CONTRAST)

    rows = torch.arange(small_height, dtype=torch.float32)[:, None]
    columns = torch.arange(small_width, dtype=torch.float32)[None, :]
    centre_prior = torch.exp(-0.5 * (
        ((columns + 0.5 - small_width / 2) / (0.3 * small_width)) ** 2
        + ((rows + 0.5 - small_height / 2) / (0.3 * small_height)) ** 2
    ))
    local_saliency = F.avg_pool2d((saliency * foreground)[None, None], 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    seed_score = torch.where(foreground, local_saliency * centre_prior, torch.full_like(saliency, -1.0))
    seed_index = int(torch.argmax(seed_score))
    seed = (seed_index // small_width, seed_index % small_width)

    bridged = F.max_pool2d(foreground.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
    subject = _grow_region(seed, bridged) & foreground

    ys, xs = torch.nonzero(subject, as_tuple=True)
    box_left, box_right = float(xs.min()) * scale_x, (float(xs.max()) + 1) * scale_x
    box_top, box_bottom = float(ys.min()) * scale_y, (float(ys.max()) + 1) * scale_y
    padding = 0.03 * max(box_right - box_left, box_bottom - box_top)
    box = Box(
        max(0, int(math.floor(box_left - padding))),
        max(0, int(math.floor(box_top - padding))),
        min(width, int(math.ceil(box_right + padding))),
        min(height, int(math.ceil(box_bottom + padding))),
    )

    centroid_x, centroid_y = xs.float().mean(), ys.float().mean()
    nearest = int(torch.argmin((xs.float() - centroid_x) ** 2 + (ys.float() - centroid_y) ** 2))
    point = ((float(xs[nearest]) + 0.5) * scale_x, (float(ys[nearest]) + 0.5) * scale_y)
    return SubjectPrompt(box=box, point=point, found=True)


def central_salient_box(image_rgb: torch.Tensor) -> Box:
    """The box of ``find_salient_subject``."""
    return find_salient_subject(image_rgb).box


def pick_best_mask(
    masks: "torch.Tensor | np.ndarray",
    scores: "torch.Tensor | np.ndarray | Sequence[float]",
    image_size: Tuple[int, int],
) -> int:
    """Index of the candidate mask most likely to be the subject.

    Args:
        masks: ``[N, h, w]`` candidates (bool, or float where >= 0.5 is
            subject), e.g. SAM's multimask output.
        scores: ``[N]`` quality scores (SAM's predicted IoU).
        image_size: ``(H, W)`` of the image the masks cover; their centroids
            are measured in that frame.

    Each candidate gets ``score - 0.5 * whole_image - 0.25 * off_centre``,
    where ``whole_image`` rises from 0 at 90 % coverage to 1 at 100 % (a mask
    of everything is the background's doing, not a subject) and
    ``off_centre`` is the centroid's distance from the image centre (0 at
    the centre, 1 at a corner).  Empty candidates never win unless all are
    empty, when the best-scored one is returned.  Ties go to the first.
    """
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64) if not isinstance(scores, torch.Tensor) else scores)
    if masks.ndim != 3 or scores.ndim != 1 or masks.shape[0] != scores.shape[0] or masks.shape[0] == 0:
        raise ValueError(
            f"Expected N masks [N, height, width] and N scores [N], got {tuple(masks.shape)} and {tuple(scores.shape)}."
        )
    image_height, image_width = image_size
    mask_height, mask_width = masks.shape[1:]
    foreground = masks.float() >= FOREGROUND_THRESHOLD

    best_index, best_value = None, -math.inf
    for index in range(masks.shape[0]):
        ys, xs = torch.nonzero(foreground[index], as_tuple=True)
        if ys.numel() == 0:
            continue
        coverage = ys.numel() / float(mask_height * mask_width)
        whole_image = max(0.0, coverage - 0.9) / 0.1
        centroid_x = (float(xs.float().mean()) + 0.5) * image_width / mask_width
        centroid_y = (float(ys.float().mean()) + 0.5) * image_height / mask_height
        off_centre = math.hypot(
            (centroid_x - image_width / 2) / (image_width / 2),
            (centroid_y - image_height / 2) / (image_height / 2),
        ) / math.sqrt(2.0)
        value = float(scores[index]) - 0.5 * whole_image - 0.25 * off_centre
        if value > best_value:
            best_index, best_value = index, value
    if best_index is None:
        return int(torch.argmax(scores))
    return best_index
