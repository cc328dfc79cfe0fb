"""The DreamCache conditioning adapter (Aiello et al., CVPR 2025), in plain torch.

Per memory layer, with x the input of transformer block 0, a1 its
self-attention output and R the cached reference tokens:

    m   = MemAttn(LN_m(x), R)                 (multi-head cross-attention)
    out = W_cat [a1 ; m] + b_cat              (replaces a1 in x <- x + a1)

ComfyUI's attention patches see n = norm1(x), not x, so LN_m is stored
already folded against the base model's norm1: LN_m(x) = scale * n + shift with
scale = gamma_m / gamma_1 and shift = beta_m - gamma_m * beta_1 / gamma_1.
A freshly built adapter starts from LN_m = norm1 (scale 1, shift 0); the
authors' checkpoints carry raw (gamma_m, beta_m) and are folded on load.

A fresh adapter is an exact identity: W_cat = [I | 0], b_cat = 0.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers  # looked up at call time (layers.discover_memory_layers, ...): tests substitute them
from .layers import MemoryLayerSpec
from .normal_tensors import normal_tensors
from .base_family import base_family, block_names, describe_base, mismatch_advice

AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor]


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain multi-head attention. q [B, Lq, H*D]; k, v [B or 1, Lk, H*D];
    key_mask [B or 1, Lk]: bool (True = attend) or floating (an additive logit bias, e.g. log reference weights).
    Returns [B, Lq, H*D]."""
    batch, length_q, inner = q.shape
    dim_head = inner // heads
    if k.shape[0] != batch:
        k = k.expand(batch, -1, -1)
        v = v.expand(batch, -1, -1)
    q = q.view(batch, length_q, heads, dim_head).transpose(1, 2)
    k = k.reshape(batch, k.shape[1], heads, dim_head).transpose(1, 2)
    v = v.reshape(batch, v.shape[1], heads, dim_head).transpose(1, 2)
    attn_mask = None
    if key_mask is not None:
        attn_mask = key_mask.to(torch.bool) if not key_mask.is_floating_point() else key_mask.to(q.dtype)
        attn_mask = attn_mask.expand(batch, -1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(batch, length_q, inner)


class MemoryAdapterLayer(nn.Module):
    """Adapter of one memory layer: LN_m (folded), memory attention, W_cat."""

    def __init__(self, spec: MemoryLayerSpec):
        super().__init__()
        self.spec = spec
        inner = spec.heads * spec.dim_head
        self.mem_norm_scale = nn.Parameter(torch.ones(spec.dim))
        self.mem_norm_shift = nn.Parameter(torch.zeros(spec.dim))
        self.to_q = nn.Linear(spec.dim, inner, bias=False)
        self.to_k = nn.Linear(spec.channels, inner, bias=False)
        self.to_v = nn.Linear(spec.channels, inner, bias=False)
        self.to_out = nn.Linear(inner, spec.dim)
        self.linear_cat = nn.Linear(2 * spec.dim, spec.dim)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self):
        """W_cat = [I | 0], b_cat = 0: the layer returns a1 unchanged, bit for bit."""
        d = self.spec.dim
        self.linear_cat.weight.zero_()
        self.linear_cat.weight[:, :d].copy_(torch.eye(d))
        self.linear_cat.bias.zero_()

    def project_memory(self, memory_tokens: torch.Tensor, weights: Optional[dict] = None):
        """Memory keys and values, W_k R and W_v R. memory_tokens [N, L, C]."""
        w = weights or self.runtime_weights()
        return F.linear(memory_tokens, w["to_k"]), F.linear(memory_tokens, w["to_v"])

    def runtime_weights(self, dtype: Optional[torch.dtype] = None, device=None) -> dict:
        """The layer's tensors as a dict, optionally cast (differentiable)."""
        out = {
            "mem_norm_scale": self.mem_norm_scale,
            "mem_norm_shift": self.mem_norm_shift,
            "to_q": self.to_q.weight,
            "to_k": self.to_k.weight,
            "to_v": self.to_v.weight,
            "to_out_weight": self.to_out.weight,
            "to_out_bias": self.to_out.bias,
            "cat_weight": self.linear_cat.weight,
            "cat_bias": self.linear_cat.bias,
        }
        if dtype is not None or device is not None:
            out = {k: v.to(device=device, dtype=dtype) for k, v in out.items()}
        return out

    def forward(self, n: torch.Tensor, a1: torch.Tensor, memory_k: torch.Tensor, memory_v: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None, weights: Optional[dict] = None,
                attention: AttentionFunction = multihead_attention) -> torch.Tensor:
        """New self-attention output W_cat [a1 ; m] + b_cat.

        n:  norm1(x) of the block, [B, L, dim]
        a1: the block's self-attention output, [B, L, dim]
        memory_k / memory_v: projected memory, [B or 1, Lk, heads*dim_head]
        """
        w = weights or self.runtime_weights()
        normed = n * w["mem_norm_scale"] + w["mem_norm_shift"]
        q = F.linear(normed, w["to_q"])
        m = attention(q, memory_k, memory_v, self.spec.heads, key_mask)
        m = F.linear(m, w["to_out_weight"], w["to_out_bias"])
        return F.linear(torch.cat([a1, m], dim=-1), w["cat_weight"], w["cat_bias"])


class DreamCacheAdapter(nn.Module):
    """All memory-layer adapters of one base model, keyed by layer key.

    ``signature`` is the base model's (see ``layers.model_signature``);
    ``norm_folded`` is False only for an authors' checkpoint whose LN_m has not
    been folded against a base model's norm1 yet (see ``fold_norms``).
    """

    def __init__(self, specs: list[MemoryLayerSpec], signature: Optional[dict] = None, norm_folded: bool = True):
        super().__init__()
        self.specs = {spec.key: spec for spec in specs}
        with normal_tensors():  # trainable even when a node builds it inside ComfyUI's inference mode
            self.layers = nn.ModuleDict({_module_name(spec.key): MemoryAdapterLayer(spec) for spec in specs})
        self.signature = signature or {}
        self.norm_folded = norm_folded

    def layer(self, key: str) -> MemoryAdapterLayer:
        return self.layers[_module_name(key)]

    def keys(self):
        return list(self.specs)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset_to_identity(self):
        for layer in self.layers.values():
            layer.reset_to_identity()

    @torch.no_grad()
    def randomize_(self, seed: int = 0, scale: float = 1.0):
        """Fill every tensor with seeded random values (tests, smoke runs)."""
        gen = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(fan_in))
        return self

    @torch.no_grad()
    def fold_norms(self, norm1_by_key: dict) -> "DreamCacheAdapter":
        """Fold raw LN_m (gamma_m, beta_m) against the base's norm1 (gamma_1, beta_1), in place.

        Afterwards LN_m(x) == scale * norm1(x) + shift exactly (up to rounding).
        """
        if self.norm_folded:
            return self
        for key in self.keys():
            norm1 = norm1_by_key[key]
            gamma_1 = norm1.weight.detach().float().cpu()
            beta_1 = (norm1.bias.detach().float().cpu() if norm1.bias is not None
                      else torch.zeros_like(gamma_1))
            if torch.any(gamma_1 == 0):
                raise ValueError(
                    f"Cannot fold the adapter's LN_m into layer {key}: the base model's norm1 has zero scales. "
                    "This base model is not the one the adapter was trained for."
                )
            layer = self.layer(key)
            gamma_m = layer.mem_norm_scale.detach().float().clone()
            beta_m = layer.mem_norm_shift.detach().float().clone()
            layer.mem_norm_scale.copy_(gamma_m / gamma_1)
            layer.mem_norm_shift.copy_(beta_m - gamma_m * beta_1 / gamma_1)
        self.norm_folded = True
        return self


def _module_name(key: str) -> str:
    return key.replace(".", "_")


def build_adapter(specs: list[MemoryLayerSpec], signature: Optional[dict] = None, seed: int = 0) -> DreamCacheAdapter:
    """A fresh adapter (exact identity) with seeded attention weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        adapter = DreamCacheAdapter(specs, signature)
    finally:
        torch.random.set_rng_state(generator_state)
    return adapter


def check_adapter_fits(adapter: DreamCacheAdapter, model) -> None:
    """Raise a clear error when ``adapter`` was made for another base model (widths, heads or layers differ),
    naming the adapter's base family and the model's (SD1.5, SD2.x, SDXL or an unknown base)."""
    model_layers = layers.discover_memory_layers(model)
    model_specs = {s.key: s for s in model_layers}
    model_context = layers.model_signature(model)["context_dim"]
    adapter_specs = adapter.specs
    adapter_context = adapter.signature.get("context_dim") if adapter.signature else None
    adapter_family = base_family(specs=adapter_specs.values(), context_dim=adapter_context)
    model_family = base_family(specs=model_layers, context_dim=model_context)
    bases = (f"This DreamCache adapter was made for another base model: it was trained for "
             f"{describe_base(specs=adapter_specs.values(), context_dim=adapter_context)}, but the model is "
             f"{describe_base(specs=model_layers, context_dim=model_context)}.")
    advice = mismatch_advice(adapter_family, model_family)
    if sorted(adapter_specs) != sorted(model_specs):
        raise ValueError(
            f"{bases} The adapter's memory layers are {block_names(adapter_specs.values())}; the model's are "
            f"{block_names(model_layers)}. {advice}"
        )
    for key, spec in adapter_specs.items():
        found = model_specs[key]
        if (spec.dim, spec.heads, spec.dim_head, spec.channels) != (found.dim, found.heads, found.dim_head, found.channels):
            authors = ("" if adapter.norm_folded else
                       " An authors' checkpoint loaded on its own is read with the SD2.x head layout (heads of 64); "
                       "for another base convert it with `python -m dreamcache_core.comfy_bridge.convert_authors "
                       "--adapter <file> --base <base checkpoint>`.")
            raise ValueError(
                f"{bases} Layer {key} is {spec.dim} wide with {spec.heads} heads of {spec.dim_head} "
                f"({spec.channels} input channels) in the adapter, {found.dim} wide with {found.heads} heads of "
                f"{found.dim_head} ({found.channels} input channels) in the model. {advice}{authors}"
            )
    if adapter_context is not None and model_context is not None and adapter_context != model_context:
        raise ValueError(
            f"{bases} Their memory layers match, but the text encoders differ (text width {adapter_context} vs "
            f"{model_context}). {advice}"
        )


def adapter_for_model(adapter: DreamCacheAdapter, model) -> DreamCacheAdapter:
    """Check ``adapter`` against ``model`` and return it ready to inject (an authors' checkpoint gets a
    folded copy; the loaded object is left as it is)."""
    check_adapter_fits(adapter, model)
    if adapter.norm_folded:
        return adapter
    with normal_tensors():
        folded = copy.deepcopy(adapter)
    return folded.fold_norms(layers.memory_norm1(model))
