"""The reference cache: memory-layer features of one Encode pass.

Per memory layer the tensor entering the spatial transformer, [N, C, h, w]
(N references), stored compactly (fp16 on CPU), plus an optional per-layer
token mask [N, h*w] (True = subject token: background tokens are left out of
the memory keys and values) and metadata (model signature, latent size, seed,
sigma/timestep).

All references of one cache form ONE memory: the keys and values are the union
of the subject tokens of every reference, shared by every image of the batch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .layers import describe_layers, MemoryLayerSpec

FORMAT_NAME = "cache"
FORMAT_VERSION = "1"
STORAGE_DTYPE = torch.float16


class CacheFileError(ValueError):
    """A file that cannot be read as a DreamCache cache."""


@dataclass
class DreamCache:
    features: dict  # layer key -> [N, C, h, w] tensor (STORAGE_DTYPE, CPU)
    token_masks: dict = field(default_factory=dict)  # layer key -> [N, h*w] bool, or absent = all tokens
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.features = {k: v.detach().to("cpu", STORAGE_DTYPE).contiguous() for k, v in self.features.items()}
        self.token_masks = {k: v.detach().to("cpu", torch.bool).contiguous() for k, v in self.token_masks.items()}
        self._materialized: dict = {}

    @property
    def keys(self) -> list[str]:
        return list(self.features)

    @property
    def num_references(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0

    @property
    def signature(self) -> dict:
        return self.metadata.get("signature", {})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())

    def memory_tokens(self, key: str, device=None, dtype=None) -> torch.Tensor:
        """The memory of layer ``key`` as tokens [1, L, C]: the subject tokens of every reference.

        Moved to ``device``/``dtype`` once and kept: repeated calls (every sampling step) reuse it.
        """
        memo_key = (key, str(device), dtype)
        cached = self._materialized.get(memo_key)
        if cached is not None:
            return cached
        features = self.features[key]
        tokens = features.flatten(2).transpose(1, 2)  # [N, h*w, C]
        mask = self.token_masks.get(key)
        if mask is not None:
            tokens = tokens[mask]  # [sum of subject tokens, C]
        else:
            tokens = tokens.reshape(-1, tokens.shape[-1])
        tokens = tokens.unsqueeze(0).to(device=device, dtype=dtype or torch.float32)
        self._materialized[memo_key] = tokens
        return tokens

    def release_device_copies(self):
        self._materialized.clear()

    def to_dict(self) -> dict:
        return {"features": self.features, "token_masks": self.token_masks, "metadata": self.metadata}


def token_masks_from_mask(mask: torch.Tensor, feature_sizes: dict, threshold: float = 0.5) -> dict:
    """Per-layer token masks from a subject mask [N or 1, H, W] (1 = subject).

    A token is a subject token when the mask covers at least ``threshold`` of its area. A layer where no
    token reaches the threshold (a small subject at a coarse layer) keeps the tokens the subject touches.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    mask = mask.float().clamp(0, 1)
    if mask.sum() == 0:
        raise ValueError("The reference mask is empty (no subject pixels). Draw or segment the subject, "
                         "or leave the mask input unconnected to use the whole reference.")
    out = {}
    for key, (n, h, w) in feature_sizes.items():
        coverage = F.adaptive_avg_pool2d(mask[:, None], (h, w))[:, 0]
        if coverage.shape[0] == 1 and n > 1:
            coverage = coverage.expand(n, -1, -1)
        if coverage.shape[0] != n:
            raise ValueError(f"The mask batch has {mask.shape[0]} masks for {n} references; give one mask, "
                             "or one per reference image.")
        keep = coverage >= threshold
        for i in range(n):
            if not keep[i].any():
                if coverage[i].max() <= 0:
                    raise ValueError(f"The mask of reference {i} is empty. Give each reference a mask with "
                                     "subject pixels.")
                keep[i] = coverage[i] > 0
        out[key] = keep.flatten(1)
    return out


def check_cache_fits(cache: DreamCache, specs: list[MemoryLayerSpec], signature: Optional[dict] = None):
    """Raise a clear error when ``cache`` was taken on a model with other memory layers."""
    expected = {s.key: s for s in specs}
    if sorted(cache.keys) != sorted(expected):
        raise ValueError(
            f"This DreamCache was encoded on another model: it holds layers {sorted(cache.keys)} but this "
            f"model's memory layers are {describe_layers(specs)}. Encode the reference with the same MODEL "
            "you apply it to."
        )
    for key, spec in expected.items():
        channels = cache.features[key].shape[1]
        if channels != spec.channels:
            raise ValueError(
                f"This DreamCache was encoded on another model: layer {key} has {channels} channels, the model "
                f"has {spec.channels}. Encode the reference with the same MODEL you apply it to."
            )
    if signature and cache.signature and signature.get("context_dim") != cache.signature.get("context_dim"):
        raise ValueError(
            f"This DreamCache was encoded on a model with text width {cache.signature.get('context_dim')}, "
            f"this one has {signature.get('context_dim')} (another base model). Encode the reference again with "
            "this MODEL."
        )


def save_cache(cache: DreamCache, path: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"features.{k}": v for k, v in cache.features.items()}
    tensors.update({f"token_mask.{k}": v.to(torch.uint8) for k, v in cache.token_masks.items()})
    metadata = {
        "dreamcache_format": FORMAT_NAME,
        "dreamcache_version": FORMAT_VERSION,
        "metadata": json.dumps(cache.metadata, sort_keys=True),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def load_cache(path: str) -> DreamCache:
    from safetensors import safe_open

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DreamCache file not found: {path}")
    if not path.lower().endswith(".safetensors"):
        raise CacheFileError(f"{name} is not a .safetensors file; DreamCache caches are saved as .safetensors.")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:
        raise CacheFileError(f"{name} could not be read as safetensors ({error}): the file is truncated or "
                             "corrupt. Save the cache again.") from error
    if meta.get("dreamcache_format") != FORMAT_NAME:
        raise CacheFileError(f"{name} is not a DreamCache cache (it may be an adapter or a model). Pick a file "
                             "written by Save DreamCache.")
    features = {k[len("features."):]: v for k, v in tensors.items() if k.startswith("features.")}
    masks = {k[len("token_mask."):]: v.bool() for k, v in tensors.items() if k.startswith("token_mask.")}
    return DreamCache(features, masks, json.loads(meta.get("metadata", "{}")))
