"""The attention patch callables that inject a DreamCache into ComfyUI's U-Net.

ComfyUI protocol (DESIGN.md section 2): ``attn1_patch(n, context, value,
extra_options)`` sees n = norm1(x) before self-attention and
``attn1_output_patch(a1, extra_options)`` sees the self-attention output; both
get the same ``extra_options`` dict within one transformer-block call, so the
first leaves n there for the second.

The output patch replaces a1 by a1 + s * (adapter(n, a1, memory) - a1) on the
batch rows that are active (their chunk is included and the step's sigma lies
inside [sigma_end, sigma_start]); every other row, layer and block is returned
bit for bit as it came. Training and inference use these same objects.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from .adapter import DreamCacheAdapter, multihead_attention
from .cache import DreamCache

POSITIVE_CHUNK = 0  # index of the positive cond list in KSampler's cond_or_uncond


class DreamCacheInjection:
    """State shared by the two patch callables of one Apply.

    adapter, cache:   what to inject (cache layers must match adapter layers)
    strength:         global s; ``layer_strengths`` multiplies it per layer key
    sigma_start/end:  active while sigma_end <= sigma <= sigma_start
    chunks:           cond_or_uncond values to personalise (None = all)
    reuse_memory_kv:  when gradients are off, W_k R and W_v R (and the cast weights) are computed once
                      per device/dtype and reused by every step; training always recomputes them
    """

    def __init__(self, adapter: DreamCacheAdapter, cache: DreamCache, strength: float = 1.0,
                 sigma_start: float = math.inf, sigma_end: float = 0.0, chunks: Optional[Iterable[int]] = (POSITIVE_CHUNK,),
                 layer_strengths: Optional[dict] = None, reuse_memory_kv: bool = True, attention=multihead_attention):
        if not adapter.norm_folded:
            raise ValueError("The adapter's LN_m is not folded against the base model yet (authors' checkpoint); "
                             "Apply DreamCache folds it when given the model.")
        self.adapter = adapter
        self.cache = cache
        self.strength = float(strength)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.chunks = None if chunks is None else frozenset(int(c) for c in chunks)
        self.layer_strengths = dict(layer_strengths or {})
        self.reuse_memory_kv = reuse_memory_kv
        self.attention = attention
        self.layers_by_block = {spec.block: key for key, spec in adapter.specs.items()}
        self.state_key = f"dreamcache_norm1_{id(self)}"
        self._memo: dict = {}
        self.attn1_patch = DreamCacheNorm1Patch(self)
        self.attn1_output_patch = DreamCacheOutputPatch(self)

    def memory_layer_of(self, extra_options: dict) -> Optional[str]:
        if extra_options.get("block_index", 0) != 0:
            return None
        block = extra_options.get("block")
        if block is None:
            return None
        return self.layers_by_block.get((block[0], int(block[1])))

    def active_rows(self, batch: int, extra_options: dict) -> Optional[torch.Tensor]:
        """Bool [batch] of rows to personalise, or None when no row is."""
        active = torch.ones(batch, dtype=torch.bool)
        if self.chunks is not None:
            chunk_ids = extra_options.get("cond_or_uncond")
            if chunk_ids:
                per_chunk = batch // len(chunk_ids)
                active &= torch.tensor([c in self.chunks for c in chunk_ids]).repeat_interleave(per_chunk)
        sigmas = extra_options.get("sigmas")
        if sigmas is not None and (self.sigma_start != math.inf or self.sigma_end > 0):
            sigma = sigmas.detach().float().cpu().reshape(-1)
            if sigma.numel() == 1:
                sigma = sigma.expand(batch)
            active &= (sigma <= self.sigma_start) & (sigma >= self.sigma_end)
        return active if bool(active.any()) else None

    def layer_inputs(self, key: str, device, dtype):
        """(weights dict, memory keys, memory values) for layer ``key`` on ``device``/``dtype``."""
        layer = self.adapter.layer(key)
        if torch.is_grad_enabled() or not self.reuse_memory_kv:
            weights = layer.runtime_weights(dtype, device)
            tokens = self.cache.memory_tokens(key, device, dtype)
            k, v = layer.project_memory(tokens, weights)
            return weights, k, v
        version = tuple(p._version for p in layer.parameters())
        memo_key = (key, str(device), dtype)
        found = self._memo.get(memo_key)
        if found is None or found[0] != version:
            weights = {k: t.detach() for k, t in layer.runtime_weights(dtype, device).items()}
            tokens = self.cache.memory_tokens(key, device, dtype)
            k, v = layer.project_memory(tokens, weights)
            found = (version, weights, k, v)
            self._memo[memo_key] = found
        return found[1], found[2], found[3]

    def to(self, device):
        """ComfyUI moves patches with the model; device copies are made lazily, once per device/dtype."""
        return self

    def release_device_copies(self):
        self._memo.clear()
        self.cache.release_device_copies()

    def models(self):
        return []


class DreamCacheNorm1Patch:
    """attn1_patch: leave n = norm1(x) of memory-layer block 0 for the output patch."""

    def __init__(self, injection: DreamCacheInjection):
        self.injection = injection

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        if self.injection.memory_layer_of(extra_options) is not None:
            extra_options[self.injection.state_key] = n
        return n, context_attn1, value_attn1

    def to(self, device):
        self.injection.to(device)
        return self

    def models(self):
        return []


class DreamCacheOutputPatch:
    """attn1_output_patch: a1 -> a1 + s * (adapter(n, a1, memory) - a1) on active rows."""

    def __init__(self, injection: DreamCacheInjection):
        self.injection = injection

    def __call__(self, a1, extra_options):
        injection = self.injection
        key = injection.memory_layer_of(extra_options)
        if key is None:
            return a1
        n = extra_options.pop(injection.state_key, None)
        if n is None:
            return a1
        strength = injection.strength * injection.layer_strengths.get(key, 1.0)
        if strength == 0:
            return a1
        rows = injection.active_rows(a1.shape[0], extra_options)
        if rows is None:
            return a1
        weights, memory_k, memory_v = injection.layer_inputs(key, a1.device, a1.dtype)
        layer = injection.adapter.layer(key)
        all_rows = bool(rows.all())
        a1_active = a1 if all_rows else a1[rows.to(a1.device)]
        n_active = n if all_rows else n[rows.to(n.device)]
        adapted = layer(n_active, a1_active, memory_k, memory_v, weights=weights, attention=injection.attention)
        if strength != 1.0:
            adapted = a1_active + strength * (adapted - a1_active)
        if all_rows:
            return adapted
        out = a1.clone()
        out[rows.to(a1.device)] = adapted
        return out

    def to(self, device):
        self.injection.to(device)
        return self

    def models(self):
        return []


def attach_injection(model_patcher, injection: DreamCacheInjection):
    """Register the injection's two callables on a ModelPatcher (call on a clone)."""
    model_patcher.set_model_attn1_patch(injection.attn1_patch)
    model_patcher.set_model_attn1_output_patch(injection.attn1_output_patch)
    return model_patcher
