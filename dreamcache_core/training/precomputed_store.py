"""Prepared training samples and the precomputed store, a folder (plain torch, no ComfyUI).

``store.json`` (format name/version, sample count, model signature, what is
inside) + ``special.safetensors`` (the empty caption's text embedding and the
null reference: a white image's latent, and its cache when caches were
precomputed) + ``samples/<index // 1000>/<index>.safetensors`` holding, per sample,
``target_latent`` [C, h, w] (raw VAE latent, as in a LATENT), ``reference_latent``,
optional ``reference_mask`` [H, W], ``text_cond`` [T, D], optional ``text_pooled``
and optionally the reference cache (``cache.features.<layer>``,
``cache.token_mask.<layer>``). Training from a store costs U-Net passes only
(plus the t = 1 reference pass when caches were not precomputed).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..method.cache import DreamCache


STORE_FORMAT = "dreamcache-training-store"
STORE_VERSION = "1"
SAMPLES_PER_FOLDER = 1000  # precomputed samples per sub-folder of samples/


@dataclass
class PreparedSample:
    """One sample in latent space: everything a step needs except (optionally) the reference cache."""

    target_latent: torch.Tensor              # [C, h, w], raw VAE latent (what a LATENT dict holds)
    reference_latent: torch.Tensor           # [C, h', w']
    text_cond: torch.Tensor                  # [T, D]
    text_pooled: Optional[torch.Tensor] = None
    reference_mask: Optional[torch.Tensor] = None   # [H, W] in 0..1
    cache: object = None                     # a DreamCache when precomputed
    caption: str = ""


@dataclass
class SpecialInputs:
    """The empty caption (caption dropout; the caching pass's text) and the null reference (reference dropout)."""

    empty_cond: torch.Tensor
    empty_pooled: Optional[torch.Tensor]
    null_reference_latent: torch.Tensor
    null_cache: object = None


def _cache_tensors(cache, prefix="cache.") -> dict:
    out = {f"{prefix}features.{k}": v for k, v in cache.features.items()}
    out.update({f"{prefix}token_mask.{k}": v.to(torch.uint8) for k, v in cache.token_masks.items()})
    return out


def _cache_from_tensors(tensors: dict, metadata: dict, prefix="cache."):
    features = {k[len(prefix + "features."):]: v for k, v in tensors.items() if k.startswith(prefix + "features.")}
    if not features:
        return None
    masks = {k[len(prefix + "token_mask."):]: v.bool() for k, v in tensors.items()
             if k.startswith(prefix + "token_mask.")}
    return DreamCache(features, masks, metadata)


class PrecomputedStore:
    """Read/write the precomputed folder described in the module docstring."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.info: dict = {}
        info_path = os.path.join(self.root, "store.json")
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as handle:
                self.info = json.load(handle)
            if self.info.get("format") != STORE_FORMAT:
                raise ValueError(f"{info_path} is not a DreamCache training store (format {self.info.get('format')!r}).")
            if str(self.info.get("version")) != STORE_VERSION:
                raise ValueError(f"{info_path} has store version {self.info.get('version')}; this pack reads "
                                 f"{STORE_VERSION}. Precompute it again.")

    @staticmethod
    def is_store(path: str) -> bool:
        return os.path.isfile(os.path.join(path, "store.json"))

    def __len__(self):
        return int(self.info.get("count", 0))

    @property
    def has_caches(self) -> bool:
        return bool(self.info.get("has_caches"))

    def sample_path(self, index: int) -> str:
        """``samples/<index // SAMPLES_PER_FOLDER>/<index>.safetensors`` (a few thousand files per folder, also
        for hundreds of thousands of samples); stores written before that layout keep theirs flat in samples/."""
        nested = os.path.join(self.root, "samples", f"{index // SAMPLES_PER_FOLDER:05d}", f"{index:08d}.safetensors")
        if not os.path.isfile(nested):
            flat = os.path.join(self.root, "samples", f"{index:08d}.safetensors")
            if os.path.isfile(flat):
                return flat
        return nested

    @property
    def reference_variants(self) -> int:
        """How many augmented references each sample holds (1 for stores written without ``--augment-variants``)."""
        return max(1, int(self.info.get("reference_variants", 1)))

    def write_sample(self, index: int, sample: PreparedSample, variants: tuple = ()) -> None:
        """Write ``sample``; ``variants`` are further PreparedSamples whose reference (latent, mask, cache) are
        stored as reference variants 1, 2, ... (``variant.<k>.`` keys) beside the sample's own (variant 0)."""
        from safetensors.torch import save_file

        tensors = {"target_latent": sample.target_latent, "text_cond": sample.text_cond}
        if sample.text_pooled is not None:
            tensors["text_pooled"] = sample.text_pooled
        metadata = {"caption": sample.caption}
        for number, variant in enumerate((sample,) + tuple(variants)):
            prefix = f"variant.{number}." if number else ""
            tensors[prefix + "reference_latent"] = variant.reference_latent
            if variant.reference_mask is not None:
                tensors[prefix + "reference_mask"] = variant.reference_mask
            if variant.cache is not None:
                tensors.update(_cache_tensors(variant.cache, prefix + "cache."))
                metadata[prefix + "cache_metadata"] = json.dumps(variant.cache.metadata, sort_keys=True)
        if variants:
            metadata["reference_variants"] = str(1 + len(variants))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = self.sample_path(index)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)

    def read_sample(self, index: int, variant: int = 0) -> PreparedSample:
        """Sample ``index`` with its reference variant ``variant`` (only that variant's tensors are read)."""
        from safetensors import safe_open

        path = self.sample_path(index)
        if not os.path.isfile(path):
            raise ValueError(f"Sample {index} is missing from the precomputed store {self.root} ({path}); "
                             "precompute it again.")
        prefix = f"variant.{variant}." if variant else ""
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            held = int(metadata.get("reference_variants", 1))
            if not 0 <= variant < held:
                raise ValueError(f"Sample {index} of {self.root} holds {held} reference variant(s), not variant "
                                 f"{variant}; precompute it again.")
            shared = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("variant.")
                      and k in ("target_latent", "text_cond", "text_pooled")}
            own = {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys()
                   if k.startswith(prefix) and (variant or not k.startswith("variant."))
                   and k[len(prefix):] not in ("target_latent", "text_cond", "text_pooled")}
        cache = _cache_from_tensors(own, json.loads(metadata.get(prefix + "cache_metadata", "{}")))
        return PreparedSample(shared["target_latent"], own["reference_latent"], shared["text_cond"],
                              shared.get("text_pooled"), own.get("reference_mask"), cache,
                              metadata.get("caption", ""))

    def write_special(self, special: SpecialInputs) -> None:
        from safetensors.torch import save_file

        tensors = {"empty_cond": special.empty_cond, "null_reference_latent": special.null_reference_latent}
        if special.empty_pooled is not None:
            tensors["empty_pooled"] = special.empty_pooled
        metadata = {}
        if special.null_cache is not None:
            tensors.update(_cache_tensors(special.null_cache, "null_cache."))
            metadata["cache_metadata"] = json.dumps(special.null_cache.metadata, sort_keys=True)
        os.makedirs(self.root, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(self.root, "special.safetensors"), metadata=metadata)

    def read_special(self) -> SpecialInputs:
        from safetensors import safe_open

        with safe_open(os.path.join(self.root, "special.safetensors"), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        null_cache = _cache_from_tensors(tensors, json.loads(metadata.get("cache_metadata", "{}")), "null_cache.")
        return SpecialInputs(tensors["empty_cond"], tensors.get("empty_pooled"), tensors["null_reference_latent"],
                             null_cache)

    def write_info(self, count: int, has_caches: bool, extra: Optional[dict] = None) -> None:
        self.info = {"format": STORE_FORMAT, "version": STORE_VERSION, "count": int(count),
                     "has_caches": bool(has_caches)}
        self.info.update(extra or {})
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, "store.json"), "w", encoding="utf-8") as handle:
            json.dump(self.info, handle, indent=1, sort_keys=True)
