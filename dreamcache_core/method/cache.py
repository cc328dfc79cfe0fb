"""The reference cache: memory-layer features of one Encode pass.

Per memory layer the tensor entering the spatial transformer, [N, C, h, w]
(N references), stored compactly (fp16 on CPU), plus an optional per-layer
token mask [N, h*w] (True = subject token: background tokens are left out of
the memory keys and values) and metadata (model signature, latent size, seed,
sigma/timestep).

All references of one cache form ONE memory by default: the keys and values
are the union of the subject tokens of every reference, shared by every image
of the batch. Each reference may carry a relative weight (``reference_weights``):
the injection adds log(w_i) to the attention logits of reference i's keys, so
the softmax over the union gives reference i w_i times the mass each of its
tokens would otherwise get (weights summing to one over copies of one
reference reproduce that reference exactly). ``per_reference_tokens`` gives the
other layout, one memory per reference (padded, with a key mask), for "one
reference per image".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .layers import describe_layers, MemoryLayerSpec
from .normal_tensors import as_normal, normal_tensors

STORAGE_DTYPE = torch.float16


@dataclass
class DreamCache:
    features: dict  # layer key -> [N, C, h, w] tensor (STORAGE_DTYPE, CPU)
    token_masks: dict = field(default_factory=dict)  # layer key -> [N, h*w] bool, or absent = all tokens
    metadata: dict = field(default_factory=dict)
    reference_weights: Optional[list] = None  # relative weight per reference, or None = all equal

    def __post_init__(self):
        # Normal tensors even when encoded inside ComfyUI's inference mode: a cache may be trained from later.
        with normal_tensors():
            self.features = {k: as_normal(v.detach().to("cpu", STORAGE_DTYPE)).contiguous()
                             for k, v in self.features.items()}
            self.token_masks = {k: as_normal(v.detach().to("cpu", torch.bool)).contiguous()
                                for k, v in self.token_masks.items()}
        check_cache_layout(self.features, self.token_masks)
        if self.reference_weights is not None:
            self.reference_weights = check_reference_weights(self.reference_weights, self.num_references)
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
        def build():
            tokens = self.features[key].flatten(2).transpose(1, 2)  # [N, h*w, C]
            mask = self.token_masks.get(key)
            if mask is not None:
                tokens = tokens[mask]  # [sum of subject tokens, C]
            else:
                tokens = tokens.reshape(-1, tokens.shape[-1])
            return tokens.unsqueeze(0).to(device=device, dtype=dtype or torch.float32)

        return self._memoised((str(device), key, dtype), build)

    def _memoised(self, memo_key, build):
        """``build()``'s result, made once per ``memo_key`` (device first) from normal tensors (see ``normal_tensors``): the
        device copies are made during sampling, inside ComfyUI's inference mode, and may be used for training."""
        found = self._materialized.get(memo_key)
        if found is None:
            with normal_tensors():
                found = build()
            self._materialized[memo_key] = found
        return found

    def token_counts(self, key: str) -> list[int]:
        """Number of memory tokens each reference contributes to layer ``key``."""
        features = self.features[key]
        mask = self.token_masks.get(key)
        if mask is None:
            return [features.shape[2] * features.shape[3]] * features.shape[0]
        return [int(m.sum()) for m in mask]

    def weighted_memory_tokens(self, key: str, weights: Optional[Sequence[float]] = None, device=None, dtype=None):
        """The shared memory of layer ``key`` with per-reference weights: (tokens [1, L, C], bias [1, L] or None).

        ``weights`` (default: the cache's own) are relative; reference i's keys get the additive logit bias
        log(w_i / sum w). References of weight 0 are left out. The bias is None when every kept reference has
        the same weight (then the tokens are exactly ``memory_tokens``: a softmax ignores a common shift).
        """
        weights = self.reference_weights if weights is None else check_reference_weights(weights, self.num_references)
        if weights is None or len(set(weights)) == 1:
            return self.memory_tokens(key, device, dtype), None

        def build():
            total = sum(weights)
            counts = self.token_counts(key)
            keep = [i for i, w in enumerate(weights) if w > 0]
            tokens = self.memory_tokens(key, device, dtype)
            if len(keep) < len(weights):
                starts = [sum(counts[:i]) for i in range(len(counts))]
                index = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in keep])
                tokens = tokens[:, index.to(tokens.device)]
            kept_weights = [weights[i] for i in keep]
            if len(set(kept_weights)) == 1:
                return tokens, None
            bias = torch.cat([torch.full((counts[i],), math.log(weights[i] / total)) for i in keep])
            return tokens, bias.unsqueeze(0).to(device=device, dtype=dtype or torch.float32)

        return self._memoised((str(device), "weighted", key, tuple(weights), dtype), build)

    def per_reference_tokens(self, key: str, device=None, dtype=None):
        """One memory per reference: (tokens [N, Lmax, C], key_mask [N, Lmax] bool or None).

        References with fewer subject tokens than the longest are padded with zeros; the key mask
        (True = attend) hides the padding. It is None when no reference needs padding.
        """
        def build():
            tokens = self.features[key].flatten(2).transpose(1, 2)  # [N, h*w, C]
            mask = self.token_masks.get(key)
            key_mask = None
            if mask is not None:
                counts = self.token_counts(key)
                longest = max(counts)
                padded = tokens.new_zeros(tokens.shape[0], longest, tokens.shape[2])
                key_mask = torch.zeros(tokens.shape[0], longest, dtype=torch.bool)
                for i, count in enumerate(counts):
                    padded[i, :count] = tokens[i][mask[i]]
                    key_mask[i, :count] = True
                tokens = padded
                if bool(key_mask.all()):
                    key_mask = None
            tokens = tokens.to(device=device, dtype=dtype or torch.float32)
            return tokens, None if key_mask is None else key_mask.to(device)

        return self._memoised((str(device), "per_reference", key, dtype), build)

    def select(self, indices: Sequence[int]) -> "DreamCache":
        """A cache of the references ``indices`` only (features, token masks and weights follow)."""
        indices = [int(i) for i in indices]
        count = self.num_references
        if not indices or any(i < 0 or i >= count for i in indices):
            raise ValueError(f"Reference indices {indices} do not fit a cache of {count} references (0..{count - 1}).")
        weights = None if self.reference_weights is None else [self.reference_weights[i] for i in indices]
        metadata = dict(self.metadata, num_references=len(indices))
        return DreamCache({k: v[indices] for k, v in self.features.items()},
                          {k: v[indices] for k, v in self.token_masks.items()}, metadata, weights)

    def with_reference_weights(self, weights: Optional[Sequence[float]]) -> "DreamCache":
        """The same references (tensors shared, not copied) with other relative weights."""
        return DreamCache(self.features, self.token_masks, dict(self.metadata), weights)

    def release_device_copies(self, keep_device=None):
        """Drop the memoised copies (all, or all but those on ``keep_device``); they are remade on demand."""
        keep = None if keep_device is None else str(keep_device)
        self._materialized = {k: v for k, v in self._materialized.items() if keep is not None and k[0] == keep}

    def to_dict(self) -> dict:
        return {"features": self.features, "token_masks": self.token_masks, "metadata": self.metadata}


def check_reference_weights(weights: Sequence[float], num_references: int) -> list[float]:
    """Validate relative reference weights: one finite, non-negative number per reference, not all zero."""
    values = reference_weight_values(weights)
    if len(values) != num_references:
        raise ValueError(f"{len(values)} reference weights were given for a cache of {num_references} references; "
                         f"give exactly one weight per reference (e.g. {', '.join(['1'] * num_references)}).")
    return values


def reference_weight_values(weights: Sequence[float]) -> list[float]:
    """The weights as floats, checked without knowing the cache: finite, >= 0, not all 0, and close enough in
    magnitude that their sum and each log(w_i / sum) can be computed (``1e308, 1.7e308`` overflows)."""
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as error:
        raise ValueError(f"Reference weights must be numbers, got {weights!r}.") from error
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"Reference weights must be finite and >= 0, got {values}.")
    if not any(w > 0 for w in values):
        raise ValueError("All reference weights are 0, so no reference would be used. Give at least one weight > 0.")
    total = sum(values)
    if not math.isfinite(total) or any(w > 0 and w / total == 0 for w in values):
        raise ValueError(f"Reference weights {values} are too large or too far apart to compute with (their sum "
                         "overflows, or a share underflows to 0). They are relative: scale them to a moderate range, "
                         "e.g. '1, 1.7'.")
    return values


def parse_reference_weights(text: str, num_references: Optional[int]) -> Optional[list[float]]:
    """Weights from a comma- or space-separated string ("1, 0.5"); None for an empty string.
    ``num_references`` None checks the values only (queue-time validation, before the cache exists)."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p for p in text.replace(";", ",").replace(",", " ").split() if p]
    try:
        values = [float(p) for p in parts]
    except ValueError as error:
        raise ValueError(f"Could not read reference weights {text!r}: write numbers separated by commas, "
                         "e.g. '1, 0.5'.") from error
    if num_references is None:
        return reference_weight_values(values)
    return check_reference_weights(values, num_references)


def combine_caches(caches: Sequence[DreamCache], cache_weights: Optional[Sequence[float]] = None) -> DreamCache:
    """One cache holding the references of all ``caches`` (the memory is the union of their tokens).

    ``cache_weights`` weight each cache as a whole: reference j of cache i gets
    cache_weights[i] * (its weight within cache i, normalised to sum 1). Feature maps of different sizes
    (references encoded at other resolutions) are zero-padded to the largest and the padding is
    masked out of the memory.
    """
    caches = list(caches)
    if not caches:
        raise ValueError("Nothing to combine: give at least one DreamCache.")
    first = caches[0]
    check_same_model(caches)
    if cache_weights is None:
        cache_weights = [1.0] * len(caches)
    cache_weights = check_reference_weights(cache_weights, len(caches))
    weights = []
    for cache, cache_weight in zip(caches, cache_weights):
        own = cache.reference_weights or [1.0] * cache.num_references
        weights += [cache_weight * w / sum(own) for w in own]
    features, token_masks = {}, {}
    for key in first.keys:
        height = max(c.features[key].shape[2] for c in caches)
        width = max(c.features[key].shape[3] for c in caches)
        same_size = all(tuple(c.features[key].shape[2:]) == (height, width) for c in caches)
        parts, masks = [], []
        for cache in caches:
            feature = cache.features[key]
            n, channels, h, w = feature.shape
            mask = cache.token_masks.get(key)
            mask = torch.ones(n, h * w, dtype=torch.bool) if mask is None else mask
            if (h, w) != (height, width):
                feature = F.pad(feature, (0, width - w, 0, height - h))
                mask = F.pad(mask.view(n, h, w), (0, width - w, 0, height - h), value=False).flatten(1)
            parts.append(feature)
            masks.append(mask)
        features[key] = torch.cat(parts)
        if same_size and all(key not in c.token_masks for c in caches):
            continue
        token_masks[key] = torch.cat(masks)
    metadata = dict(first.metadata)
    metadata["num_references"] = sum(c.num_references for c in caches)
    metadata["combined_from"] = [{"num_references": c.num_references, "latent_size": c.metadata.get("latent_size"),
                                  "seed": c.metadata.get("seed")} for c in caches]
    return DreamCache(features, token_masks, metadata, weights)


COMBINE_MODES = ("union", "average", "subtract")


def check_same_model(caches: Sequence[DreamCache]) -> None:
    """ValueError unless every cache was encoded on the same model (same memory layers, channels, text width)."""
    first = caches[0]
    for other in caches[1:]:
        if sorted(other.keys) != sorted(first.keys) or any(
                other.features[k].shape[1] != first.features[k].shape[1] for k in first.keys):
            raise ValueError("These DreamCaches were encoded on different models (their memory layers differ). "
                             "Encode every reference with the same MODEL before combining them.")
        if first.signature and other.signature and first.signature.get("context_dim") != other.signature.get("context_dim"):
            raise ValueError("These DreamCaches were encoded on different base models (text widths differ). "
                             "Encode every reference with the same MODEL before combining them.")


def average_caches(caches: Sequence[DreamCache], cache_weights: Optional[Sequence[float]] = None) -> DreamCache:
    """One cache whose reference i is the weighted mean of reference i of every cache (aligned references:
    the same subject, pose and framing, encoded at the same size).

    The memory keeps the token count of one reference, so attention is spread as for a single photo; a
    token is a subject token when it is one in any of the caches. The first cache's reference weights are
    kept.
    """
    caches = list(caches)
    if not caches:
        raise ValueError("Nothing to average: give at least one DreamCache.")
    check_same_model(caches)
    weights = check_reference_weights([1.0] * len(caches) if cache_weights is None else cache_weights, len(caches))
    first = caches[0]
    counts = sorted({c.num_references for c in caches})
    if len(counts) > 1:
        raise ValueError(f"'average' needs caches with the same number of references (these hold "
                         f"{[c.num_references for c in caches]}): reference i is averaged with reference i. Use "
                         "'union' to pool references of any number.")
    for key in first.keys:
        sizes = {tuple(c.features[key].shape[2:]) for c in caches}
        if len(sizes) > 1:
            raise ValueError(f"'average' needs references encoded at the same size (layer {key} has feature maps "
                             f"{sorted(sizes)}): resize the references to one size (Mask Reference's size), or use "
                             "'union'.")
    total = sum(weights)
    features, token_masks = {}, {}
    for key in first.keys:
        mean = sum(c.features[key].float() * (w / total) for c, w in zip(caches, weights) if w > 0)
        features[key] = mean
        if any(key in c.token_masks for c in caches):
            n, _, h, w = first.features[key].shape
            masks = [c.token_masks.get(key, torch.ones(n, h * w, dtype=torch.bool)) for c, cw in zip(caches, weights)
                     if cw > 0]
            token_masks[key] = torch.stack(masks).any(0)
    metadata = dict(first.metadata)
    metadata["averaged_from"] = [{"num_references": c.num_references, "seed": c.metadata.get("seed"), "weight": w}
                                 for c, w in zip(caches, weights)]
    return DreamCache(features, token_masks, metadata, first.reference_weights)


def combine_caches_by_mode(caches: Sequence[DreamCache], cache_weights: Sequence[float], mode: str = "union"):
    """(cache, negative cache or None) for Combine DreamCache's ``mode`` (see ``COMBINE_MODES``):

    union:    every reference of every cache in one memory, each cache weighted (``combine_caches``)
    average:  the weighted mean of aligned references (``average_caches``)
    subtract: the first cache is the reference; the others (their union, weighted) become the negative
              reference that Apply DreamCache or the DreamCache Guider steer away from
    """
    caches, cache_weights = list(caches), list(cache_weights)
    if mode == "union":
        return combine_caches(caches, cache_weights), None
    if mode == "average":
        return average_caches(caches, cache_weights), None
    if mode == "subtract":
        if len(caches) < 2:
            raise ValueError("'subtract' needs a cache to subtract: connect cache_2 (and more) as what to steer "
                             "away from.")
        check_same_model(caches)
        return caches[0], combine_caches(caches[1:], cache_weights[1:])
    raise ValueError(f"mode must be one of {list(COMBINE_MODES)}, got {mode!r}.")


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


def check_cache_layout(features: dict, token_masks: dict) -> None:
    """ValueError unless every feature map is [N, C, h, w] with the same N and every token mask is [N, h*w]
    of its layer (a mismatch would otherwise only fail as an IndexError in the middle of sampling)."""
    counts = {key: tuple(f.shape)[0] if f.dim() == 4 else None for key, f in features.items()}
    bad = [key for key, count in counts.items() if count is None or count < 1]
    if bad:
        raise ValueError(f"The cache features of layers {bad} are not [references, channels, height, width] maps. "
                         "Encode the reference again.")
    if len(set(counts.values())) > 1:
        raise ValueError(f"The cache layers hold different numbers of references ({counts}). Encode the "
                         "references again.")
    unknown = sorted(set(token_masks) - set(features))
    if unknown:
        raise ValueError(f"The cache has token masks for layers {unknown} that have no features. Encode the "
                         "reference again.")
    for key, mask in token_masks.items():
        n, _, height, width = features[key].shape
        if tuple(mask.shape) != (n, height * width):
            raise ValueError(
                f"The token mask of layer {key} has shape {tuple(mask.shape)}, but its features are {n} reference(s) "
                f"of {height}x{width} tokens, which needs ({n}, {height * width}). Encode the reference again "
                "(with its mask).")


def check_cache_fits(cache: DreamCache, specs: list[MemoryLayerSpec], signature: Optional[dict] = None,
                     role: str = "cache"):
    """Raise a clear error when ``cache`` was taken on a model with other memory layers. ``role`` names the
    input the cache came through ("cache", or "negative_cache" for a negative reference)."""
    negative = role == "negative_cache"
    which = "The negative_cache (the negative reference)" if negative else "This DreamCache"
    encode = ("Encode the negative reference (Reference Noise image, other subject or Combine's negative_cache) "
              if negative else "Encode the reference ")
    expected = {s.key: s for s in specs}
    if sorted(cache.keys) != sorted(expected):
        raise ValueError(
            f"{which} was encoded on another model: it holds layers {sorted(cache.keys)} but this "
            f"model's memory layers are {describe_layers(specs)}. {encode}with the same MODEL "
            "you apply it to."
        )
    for key, spec in expected.items():
        channels = cache.features[key].shape[1]
        if channels != spec.channels:
            raise ValueError(
                f"{which} was encoded on another model: layer {key} has {channels} channels, the model "
                f"has {spec.channels}. {encode}with the same MODEL you apply it to."
            )
    if signature and cache.signature and signature.get("context_dim") != cache.signature.get("context_dim"):
        raise ValueError(
            f"{which} was encoded on a model with text width {cache.signature.get('context_dim')}, "
            f"this one has {signature.get('context_dim')} (another base model). {encode}again with "
            "this MODEL."
        )
