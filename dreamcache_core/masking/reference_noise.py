"""A degraded copy of a reference image, for a NEGATIVE reference (plain torch).

DreamCache's combined guidance has an unconditional image branch; feeding it the cache of a degraded copy of the
subject photo (noised, shuffled, faded or blurred, then VAE Encode + Encode DreamCache) makes sampling steer away
from "a blurry / noisy version of the subject", as IP-Adapter's noise node does for its image encoder.

``noised_reference`` works on the CPU in float32 (so a seed gives the same image on every device) and returns the
result on the input's device and dtype. Strength 0 returns an exact copy; the alpha channel of an RGBA image is
never changed; an optional mask limits the change to where it is above 0 (a soft mask blends proportionally).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..method.input_checks import check_finite_tensor, check_number, number_problem

MODES = ("gaussian", "shuffle", "fade", "blur")
GREY = 0.5                 # what "fade" blends toward
BLUR_SIGMA_FRACTION = 0.05  # blur sigma at strength 1, as a fraction of the image's shorter side
BLUR_RADIUS_SIGMAS = 3.0    # the blur kernel reaches this many sigmas on each side
MAX_BLUR_RADIUS = 80        # wider kernels blur a reduced copy (see ``blurred``): bounded cost
MAX_BLUR_WORK = 64_000_000  # pixels x kernel taps blurred directly per channel and pass (~1 s on one CPU core)
SEED_MAX = 0xffffffffffffffff


def noised_reference(images: torch.Tensor, mode: str, strength: float, seed: int,
                     mask: Optional[torch.Tensor] = None, on_image=None) -> torch.Tensor:
    """A degraded copy of ``images`` [B, H, W, C] (float, 0..1), same shape, device and dtype.

    mode "gaussian": clamp(image + strength * N(0, 1), 0, 1); "shuffle": a ``strength`` fraction of the pixels
    (of the masked pixels when a mask is given) trade places at random, every chosen pixel moving (colours kept,
    structure lost); "fade": lerp toward mid-grey 0.5 by ``strength``; "blur": separable gaussian blur with
    sigma = strength * 0.05 * the shorter side, reflect padding, at bounded cost on large images (see
    ``blurred``), ``on_image(done, total)`` called after each image. ``seed`` seeds a CPU torch.Generator.
    ``mask`` [B or 1, H, W] (or [H, W]): the result is lerp(image, degraded, mask), the input bit for bit where
    the mask is <= 0.
    """
    mode = check_mode(mode)
    strength = check_number(strength, "strength", 0.0, 1.0,
                            "0 leaves the image unchanged, 1 is the strongest degradation.")
    seed = check_seed(seed)
    check_image_batch(images)
    weights = None if mask is None else mask_weights(mask, images.shape)
    if strength == 0.0 or images.numel() == 0:
        return images.clone()

    colour_channels = 3 if images.shape[-1] == 4 else images.shape[-1]  # the 4th channel of RGBA is alpha
    colours = images[..., :colour_channels].detach().to(device="cpu", dtype=torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if mode == "gaussian":
        noise = torch.randn(colours.shape, generator=generator, dtype=torch.float32)
        degraded = (colours + strength * noise).clamp_(0.0, 1.0)
    elif mode == "shuffle":
        degraded = shuffled_pixels(colours, strength, generator, None if weights is None else weights > 0)
    elif mode == "fade":
        degraded = torch.lerp(colours, torch.full_like(colours, GREY), strength)
    else:
        degraded = blurred(colours, strength * BLUR_SIGMA_FRACTION * min(colours.shape[1], colours.shape[2]),
                           on_image)

    changed = None
    if weights is not None:
        blend = weights.unsqueeze(-1).expand_as(degraded)
        degraded = torch.lerp(colours, degraded, blend)
        changed = (blend > 0).to(images.device)
    result = images.clone()
    result[..., :colour_channels] = degraded.to(device=images.device, dtype=images.dtype)
    if changed is not None:  # the input itself, bit for bit, outside the mask (also for float64 input)
        result[..., :colour_channels] = torch.where(changed, result[..., :colour_channels],
                                                    images[..., :colour_channels])
    return result


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"Reference Noise mode is {mode!r}, which is not a mode. Choose one of "
                         f"{', '.join(repr(m) for m in MODES)}.")
    return mode


def check_seed(seed) -> int:
    problem = number_problem(seed, "seed", 0, SEED_MAX, "Any whole number works; the same seed gives the same image.")
    if problem is None and not float(seed).is_integer():
        problem = f"seed is {seed!r}, not a whole number. Set it to a whole number between 0 and {SEED_MAX}."
    if problem:
        raise ValueError(problem)
    return int(seed)


def check_image_batch(images) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = f"a {images.dtype} tensor" if isinstance(images, torch.Tensor) else f"a {type(images).__name__}"
        raise ValueError(f"The Reference Noise image is {kind}, not a float image. Connect an IMAGE (values 0..1), "
                         "e.g. from Load Image or Mask Reference.")
    if images.ndim != 4:
        raise ValueError(f"The Reference Noise image has shape {list(images.shape)}, not [batch, height, width, "
                         "channels]. Connect an IMAGE, e.g. from Load Image or Mask Reference.")
    check_finite_tensor(images, "The Reference Noise image",
                        "Check the node that made it: a NaN pixel would spread into the reference's cache.")


def mask_weights(mask, image_shape) -> torch.Tensor:
    """``mask`` as float32 CPU weights [B, H, W] in 0..1 for an image batch of ``image_shape``."""
    batch, height, width = image_shape[0], image_shape[1], image_shape[2]
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"The Reference Noise mask is a {type(mask).__name__}, not a tensor. Connect a MASK.")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (height, width):
        raise ValueError(f"The Reference Noise mask has shape {list(mask.shape)} but the image is {width}x{height} "
                         f"(width x height): the mask must be [batch, {height}, {width}]. Resize the mask to the "
                         "image (e.g. with the mask of the same Mask Reference / Load Image node, or a Resize "
                         "node).")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"The Reference Noise mask batch holds {mask.shape[0]} masks but the image batch holds "
                         f"{batch} images. Give one mask for all images, or one per image.")
    check_finite_tensor(mask, "The Reference Noise mask", "Give a mask with values in 0..1.")
    weights = mask.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0)
    return weights.expand(batch, height, width).contiguous()


def shuffled_pixels(colours: torch.Tensor, strength: float, generator: torch.Generator,
                    allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``colours`` [B, H, W, C] with round(strength * n) of the n (allowed) pixels of each image, chosen at random,
    moved along one random cycle: every chosen pixel takes the colour of the next, so all of them move (a pixel's
    channels stay together)."""
    batch, height, width, channels = colours.shape
    flat = colours.reshape(batch, height * width, channels)
    result = flat.clone()
    for index in range(batch):
        candidates = (torch.arange(height * width) if allowed is None
                      else allowed[index].reshape(-1).nonzero().squeeze(1))
        count = int(round(strength * len(candidates)))
        if count < 2:
            continue
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        result[index, chosen] = flat[index, chosen.roll(-1)]
    return result.reshape(colours.shape)


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def blur_reduction(sigma: float, height: int, width: int) -> int:
    """The factor f by which ``blurred`` shrinks a ``height`` x ``width`` image before blurring it with ``sigma``
    (1 = not at all): the smallest for which the kernel radius at the reduced size is within ``MAX_BLUR_RADIUS``
    and the reduced pixels times the kernel's taps within ``MAX_BLUR_WORK``."""
    factor = 1
    while True:
        small_height, small_width = math.ceil(height / factor), math.ceil(width / factor)
        taps = 2 * math.ceil(BLUR_RADIUS_SIGMAS * _reduced_sigma(sigma, factor)) + 1
        if (taps <= 2 * MAX_BLUR_RADIUS + 1 and small_height * small_width * taps <= MAX_BLUR_WORK) or \
                min(small_height, small_width) <= 1:
            return factor
        factor += 1


def _reduced_sigma(sigma: float, factor: int) -> float:
    """The blur's sigma at 1/``factor`` of the size such that area-averaging down, blurring and bilinear
    resizing back spread a point by ``sigma`` (the box and the bilinear resize add (f^2 - 1)/12 and f^2/6 to
    the variance, in pixels of the full size)."""
    if factor == 1:
        return sigma
    return math.sqrt(max(sigma ** 2 - (factor ** 2 - 1) / 12 - factor ** 2 / 6, 0.0)) / factor


def blurred(colours: torch.Tensor, sigma: float, on_image=None) -> torch.Tensor:
    """Separable gaussian blur of ``colours`` [B, H, W, C] (float32) with reflect padding, one image at a time
    (``on_image(done, total)`` after each).

    Bounded cost: a kernel reaches ceil(3 sigma) pixels to each side, and sigma grows with the image (5 % of
    its shorter side at strength 1), so blurring a large photo directly costs its pixels times a radius that
    grows with it (a 4096 px photo took minutes). Where the kernel radius is at most ``MAX_BLUR_RADIUS`` and
    pixels x taps at most ``MAX_BLUR_WORK`` (any image up to 512 px at any strength, 1024 px up to strength
    0.15) the image is blurred as it is, exactly as before. Otherwise the image is area-averaged down by
    ``blur_reduction`` = f, blurred there (both bounds hold at the reduced size), and bilinearly resized back,
    the reduced blur's sigma chosen so that the three steps spread a point by ``sigma`` (``_reduced_sigma``). The
    blur itself then costs at most 2 x ``MAX_BLUR_WORK`` multiply-adds per channel, plus two resizes linear in
    the pixels: a 4096 px photo blurs in seconds. The result is smooth at such radii and differs from the exact
    blur by a small fraction of the blur's own change (tested: under 1/255 on a 1024 px photo)."""
    batch = colours.shape[0]
    out = torch.empty_like(colours)
    for index in range(batch):
        out[index] = _blurred_image(colours[index], sigma)
        if on_image is not None:
            on_image(index + 1, batch)
    return out


def _blurred_image(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``blurred`` for one image [H, W, C]."""
    height, width, channels = image.shape
    planes = image.permute(2, 0, 1).unsqueeze(1)  # [C, 1, H, W]
    factor = blur_reduction(sigma, height, width)
    if factor == 1:
        return _exact_blur(planes, sigma)[:, 0].permute(1, 2, 0)
    small = F.interpolate(planes, size=(math.ceil(height / factor), math.ceil(width / factor)), mode="area")
    small_sigma = _reduced_sigma(sigma, factor)
    if small_sigma > 0:
        small = _exact_blur(small, small_sigma)
    restored = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return restored[:, 0].permute(1, 2, 0)


def _exact_blur(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ``planes`` [N, 1, H, W], kernel radius ceil(3 sigma), reflect padding."""
    height, width = planes.shape[-2:]
    radius = math.ceil(BLUR_RADIUS_SIGMAS * sigma)
    radius_x, radius_y = min(radius, width - 1), min(radius, height - 1)  # reflect padding needs pad < size
    if radius_x > 0:
        kernel = gaussian_kernel(sigma, radius_x).view(1, 1, 1, -1)
        planes = F.conv2d(F.pad(planes, (radius_x, radius_x, 0, 0), mode="reflect"), kernel)
    if radius_y > 0:
        kernel = gaussian_kernel(sigma, radius_y).view(1, 1, -1, 1)
        planes = F.conv2d(F.pad(planes, (0, 0, radius_y, radius_y), mode="reflect"), kernel)
    return planes
