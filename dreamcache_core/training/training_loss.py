"""The DreamCache training loss, computed through ComfyUI's own sampling code.

One prediction = one pass of ComfyUI's cond path (``CFGGuider`` at cfg 1 with a
single-pass sampler, exactly what KSampler runs for the positive prompt), on a
clone of the base MODEL carrying the SAME patch callables Apply DreamCache
uses (``injection.build_injection`` + ``attach_injection``). With gradients enabled
the callables recompute the memory keys/values from the adapter's parameters,
so only the adapter receives gradients.

The loss target, by construction from ``model_sampling``
--------------------------------------------------------
ComfyUI's model returns the denoised estimate D = calculate_denoised(sigma,
out, x_t), which is affine in the network output ``out``:
D = a(x_t) + b(sigma) * out, with a = calculate_denoised(sigma, 0, x_t) and
b = calculate_denoised(sigma, 1, 0) - calculate_denoised(sigma, 0, 0). The
base model's own target is the output that would give D = x0:
target = (x0 - a) / b, and its prediction is out = (D - a) / b, so the
residual in the model's output space is (D - x0) / b(sigma). For an epsilon
model b = -sigma and target = noise (x_t = x0 + sigma * noise); for a
v-prediction model b = -sigma / sqrt(1 + sigma^2) and target =
(noise - sigma * x0) / sqrt(1 + sigma^2), the usual v of the DDPM
parametrisation. The loss is the mean squared residual per sample: the
ordinary epsilon / v denoising loss of the base model, with no re-weighting.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..comfy_bridge import attach_injection, build_injection, single_model_pass
from ..method.cache import combine_caches
from ..method.controls import Controls


# --------------------------------------------------------------------------
# Target and residual in the model's output space
# --------------------------------------------------------------------------

def output_scale(model_sampling, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """b(sigma) of D = a(x) + b(sigma) * out, shaped to broadcast against ``like``."""
    ones = torch.ones_like(like[:, :1, :1, :1]).expand(like.shape[0], 1, 1, 1)
    zeros = torch.zeros_like(ones)
    return model_sampling.calculate_denoised(sigma, ones, zeros) - model_sampling.calculate_denoised(sigma, zeros, zeros)


def model_output_target(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The network output that makes the model's denoised estimate equal ``x0`` (noise for eps, v for v)."""
    skip = model_sampling.calculate_denoised(sigma, torch.zeros_like(x_t), x_t)
    return (x0 - skip) / output_scale(model_sampling, sigma, x_t)


def model_output_residual(model_sampling, sigma: torch.Tensor, x0: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """prediction - target in the model's output space, (D - x0) / b(sigma)."""
    return (denoised - x0) / output_scale(model_sampling, sigma, x0)


def conditioning_of(cond: torch.Tensor, pooled: Optional[torch.Tensor]) -> list:
    """A ComfyUI CONDITIONING for a batch: cond [B, T, D], pooled [B, P] or None."""
    options = {} if pooled is None else {"pooled_output": pooled}
    return [[cond, options]]


def predict_residual(model_patcher, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                     conditioning: list) -> torch.Tensor:
    """Output-space residual [B, C, h, w] of ``model_patcher`` on raw latents noised with ``noise`` at ``sigmas``.

    ``latents`` are raw VAE latents (LATENT["samples"]); ComfyUI's guider applies the model's latent
    format (``process_latent_in``) and its patches, just as KSampler does. Differentiable.
    """
    result = single_model_pass(model_patcher, latents, noise, conditioning, sigmas)
    return model_output_residual(result.model_sampling, result.sigma, result.latent, result.denoised)


# --------------------------------------------------------------------------
# The loss of a batch of rows
# --------------------------------------------------------------------------

@dataclass
class LossRow:
    """One row of a loss batch."""

    latent: torch.Tensor            # [C, h, w] raw latent of the target
    noise: torch.Tensor             # [C, h, w]
    sigma: float
    cond: torch.Tensor              # [T, D]
    pooled: Optional[torch.Tensor]  # [P] or None
    cache: object = None            # DreamCache of this row's reference, None = no adapter on this row


def sigma_of_timestep(model_patcher, timesteps) -> torch.Tensor:
    model_sampling = model_patcher.get_model_object("model_sampling")
    t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    return model_sampling.sigma(t).float().cpu()


def _group_key(row: LossRow):
    pooled_shape = None if row.pooled is None else tuple(row.pooled.shape)
    return (tuple(row.latent.shape), tuple(row.cond.shape), pooled_shape, row.cache is not None)


def denoising_losses(model_patcher, adapter, rows: list, attention=None, autocast=None) -> torch.Tensor:
    """Mean squared output-space residual of each row, [len(rows)], differentiable w.r.t. the adapter.

    Rows with a cache are predicted with the adapter injected (strength 1, every chunk, every sigma:
    ``build_injection(chunks=None)`` attached to a clone of ``model_patcher``); rows without one, or
    every row when ``adapter`` is None, by the plain base model. Rows are grouped into as few U-Net
    passes as their shapes allow (same latent size and text length); in a pass of several rows each row
    attends to its own reference only (``combine_caches`` + the injection's "per_image" reference mode).
    """
    groups: dict = {}
    for position, row in enumerate(rows):
        groups.setdefault(_group_key(row), []).append(position)
    losses: list = [None] * len(rows)
    for key, positions in groups.items():
        members = [rows[p] for p in positions]
        latents = torch.stack([r.latent for r in members]).float()
        noise = torch.stack([r.noise for r in members]).float()
        sigmas = torch.tensor([float(r.sigma) for r in members])
        cond = torch.stack([r.cond for r in members])
        pooled = None if members[0].pooled is None else torch.stack([r.pooled for r in members])
        model = model_patcher
        if adapter is not None and key[3]:
            if len(members) == 1:
                injection = build_injection(model_patcher, adapter, members[0].cache, chunks=None, attention=attention)
            else:  # row i attends to reference i only (padded memories, key-masked)
                injection = build_injection(model_patcher, adapter, combine_caches([r.cache for r in members]),
                                            Controls(reference_mode="per_image"), chunks=None, attention=attention)
            model = attach_injection(model_patcher.clone(), injection)
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            residual = predict_residual(model, latents, noise, sigmas, conditioning_of(cond, pooled))
        per_row = residual.float().pow(2).flatten(1).mean(dim=1)
        for index, position in enumerate(positions):
            losses[position] = per_row[index]
    return torch.stack(losses)


# --------------------------------------------------------------------------
# Gradient checkpointing of the U-Net blocks on the gradient path
# --------------------------------------------------------------------------

@contextlib.contextmanager
def gradient_checkpointing(unet, enabled: bool = True):
    """Recompute the activations of the middle and decoder blocks' layers in the backward pass.

    Only layers downstream of the first memory layer hold activations that need gradients; each child
    layer's ``forward`` is wrapped with ``torch.utils.checkpoint`` (non-reentrant) while the context is
    active and restored afterwards. Without gradients the layers run as they are.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    wrapped = []

    def make(original):
        @functools.wraps(original)
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            # The U-Net mutates one transformer_options dict as it walks the blocks ("block" etc.): the
            # recomputation must see it as it was at this call, so each call keeps its own shallow copy.
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return forward

    blocks = [unet.middle_block] + list(unet.output_blocks)
    try:
        for block in blocks:
            for layer in block:
                if "forward" in layer.__dict__:
                    continue
                layer.forward = make(layer.forward)
                wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.forward
