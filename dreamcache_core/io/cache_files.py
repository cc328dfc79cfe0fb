"""The cache's file format: a DreamCache saved as .safetensors and read back, checked.

Tensors ``features.<layer>`` ([N, C, h, w], fp16), ``token_mask.<layer>`` (uint8) and, when the references carry
weights, ``reference_weights`` (float64); the safetensors header's metadata holds ``dreamcache_format`` =
"cache", ``dreamcache_version`` and ``metadata`` (the cache's own metadata as JSON). Reading refuses files of
another kind, damaged JSON and non-finite features with a message that says what to do.
"""
from __future__ import annotations

import json
import os

import torch

from ..method.cache import DreamCache
from ..method.input_checks import check_finite_tensor, read_json_field

FORMAT_NAME = "cache"
FORMAT_VERSION = "1"


class CacheFileError(ValueError):
    """A file that cannot be read as a DreamCache cache."""


def save_cache(cache: DreamCache, path: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"features.{k}": v for k, v in cache.features.items()}
    tensors.update({f"token_mask.{k}": v.to(torch.uint8) for k, v in cache.token_masks.items()})
    if cache.reference_weights is not None:
        tensors["reference_weights"] = torch.tensor(cache.reference_weights, dtype=torch.float64)
    metadata = {
        "dreamcache_format": FORMAT_NAME,
        "dreamcache_version": FORMAT_VERSION,
        "metadata": json.dumps(cache.metadata, sort_keys=True),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        save_file(tensors, path, metadata=metadata)
    except OSError:
        raise
    except Exception as error:  # safetensors reports the file system's refusals as its own SafetensorError
        raise OSError(str(error)) from error


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
    again = "Save the cache again (or encode the reference again)."
    metadata = read_json_field(meta.get("metadata", "{}"), f"{name}: the 'metadata' field", again, CacheFileError)
    if not isinstance(metadata, dict):
        raise CacheFileError(f"{name}: the 'metadata' field is not a JSON object. {again}")
    features = {k[len("features."):]: v for k, v in tensors.items() if k.startswith("features.")}
    if not features:
        raise CacheFileError(f"{name} holds no features.<layer> tensors. {again}")
    for key, feature in features.items():
        check_finite_tensor(feature, f"{name}: features.{key}", f"The cache is damaged. {again}", CacheFileError)
    masks = {k[len("token_mask."):]: v.bool() for k, v in tensors.items() if k.startswith("token_mask.")}
    weights = tensors.get("reference_weights")
    weights = None if weights is None else [float(w) for w in weights.flatten()]
    try:
        return DreamCache(features, masks, metadata, weights)
    except ValueError as error:
        raise CacheFileError(f"{name}: {error}") from error
