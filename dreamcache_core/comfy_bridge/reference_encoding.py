"""Encode DreamCache: one U-Net pass at t = 1 on the reference, the memory layers' inputs kept."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..method.cache import DreamCache
from ..method.encode import cache_from_features, capture_memory_inputs
from ..method.input_checks import check_finite_tensor
from .injection_patches import without_dreamcache_patches
from .model_pass import single_model_pass

ENCODE_TIMESTEP = 1  # the reference is noised to t = 1, the least noisy step


def encode_sigma(model_patcher) -> float:
    """sigma of the encode timestep t = 1 for this model."""
    model_sampling = model_patcher.get_model_object("model_sampling")
    return float(model_sampling.sigma(torch.tensor([float(ENCODE_TIMESTEP)]))[0])


def encode_reference(model_patcher, reference_latent: torch.Tensor, conditioning, seed: int,
                     mask: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
                     on_pass: Optional[Callable[[int, int], None]] = None) -> DreamCache:
    """One U-Net pass at t = 1 on the reference latent(s) through ComfyUI's own sampling machinery.

    The model is placed by ComfyUI's memory manager and keeps every patch it carries (LoRAs, wrappers);
    ``conditioning`` is a ComfyUI CONDITIONING (typically the empty or negative prompt). Returns the
    cache of the memory layers' inputs; ``mask`` [N or 1, H, W] drops background tokens.

    ``batch_size`` bounds the references per pass (None = all in one pass): many references (the frames of an
    animation) are encoded in passes of that many, each reference noised exactly as in one pass (the noise of
    the whole batch is drawn from ``seed`` first), their features moved to the CPU after each pass. Features
    of a split batch match one pass to the U-Net kernels' rounding for another batch size (not bit for bit).
    ``on_pass(done, total)`` is called after each pass with the references encoded so far.
    """
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model_patcher, reference_latent)
    expected_channels = model_patcher.get_model_object("latent_format").latent_channels
    if latent.dim() != 4 or latent.shape[1] != expected_channels:
        raise ValueError(
            f"The reference latent has shape {tuple(latent.shape)}, but this model works on {expected_channels}-channel "
            "latents. Encode the reference image with this model's VAE (VAE Encode) before Encode DreamCache."
        )
    if torch.count_nonzero(latent) == 0:
        raise ValueError("The reference latent is all zeros (an empty latent). Encode a reference image with VAE Encode.")
    check_finite_tensor(latent, "The reference LATENT", "Check the image and the VAE Encode before Encode DreamCache "
                        "(a NaN pixel or a VAE run in too low a precision gives NaN latents).")
    if mask is not None:
        check_finite_tensor(mask, "The Encode DreamCache mask", "Give a mask with values in 0..1.")
    check_latent_size(model_patcher.model.diffusion_model, latent)
    model_patcher = without_dreamcache_patches(model_patcher)

    sigma = encode_sigma(model_patcher)
    noise = comfy.sample.prepare_noise(latent, seed)
    unet = model_patcher.model.diffusion_model
    total = int(latent.shape[0])
    step = total if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be at least 1 (references per U-Net pass), got {batch_size}.")
    parts = []
    for start in range(0, total, step):
        rows = slice(start, min(start + step, total))
        parts.append({k: v.cpu() for k, v in capture_memory_inputs(
            unet, lambda: single_model_pass(model_patcher, latent[rows], noise[rows], conditioning,
                                            torch.tensor([sigma]), seed)).items()})
        if on_pass is not None:
            on_pass(rows.stop, total)
    features = parts[0] if len(parts) == 1 else {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    metadata = {
        "latent_size": [int(latent.shape[2]), int(latent.shape[3])],
        "seed": int(seed),
        "timestep": ENCODE_TIMESTEP,
        "sigma": sigma,
        "num_references": int(latent.shape[0]),
    }
    return cache_from_features(unet, features, mask, metadata)


def check_latent_size(unet, latent: torch.Tensor) -> None:
    """ValueError when the latent is too small for the U-Net's downsampling: every downsampling but the last must
    halve a side of at least 2 latent pixels (smaller maps collapse to 1x1 and the pass fails in a GroupNorm)."""
    downsamplings = sum(1 for module in unet.input_blocks.modules() if type(module).__name__ == "Downsample")
    minimum = 2 ** max(downsamplings - 1, 0)
    height, width = int(latent.shape[2]), int(latent.shape[3])
    if min(height, width) < minimum:
        raise ValueError(
            f"The reference latent is {width}x{height}, too small for this U-Net's {downsamplings} downsamplings: it "
            f"needs at least {minimum}x{minimum} latent pixels ({minimum * 8}x{minimum * 8} image pixels). Give a "
            "larger reference image (ideally the model's resolution, e.g. 512 for SD1.5).")
