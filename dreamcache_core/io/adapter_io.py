"""Adapter files: the pack's .safetensors format, and ``load_adapter`` for it and the authors' released .pt
(read by ``authors_adapter_format``).

Our format: tensors ``<layer key>.<name>`` (names below) with metadata
``dreamcache_format`` = "adapter", ``dreamcache_version``, ``layers`` (JSON
list of MemoryLayerSpec) and ``signature`` (JSON base-model signature).
``mem_norm_scale`` / ``mem_norm_shift`` are LN_m folded against norm1.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..method.adapter import DreamCacheAdapter
from ..method.base_family import context_width_problem
from ..method.input_checks import read_json_field
from ..method.layers import MemoryLayerSpec
from ..method.normal_tensors import normal_tensors
from .adapter_tensors import (TENSOR_NAMES, AdapterFileError, check_file_shapes, check_spec_bounds, copy_into,
                              expected_keys)
from .authors_adapter_format import adapter_from_authors_state_dict, torch_load_safely

FORMAT_NAME = "adapter"
FORMAT_VERSION = "1"



def adapter_state_dict(adapter: DreamCacheAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for key in adapter.keys():
        params = dict(adapter.layer(key).named_parameters())
        for name, (path, _) in TENSOR_NAMES.items():
            out[f"{key}.{name}"] = params[path].detach().float().cpu().contiguous()
    return out


def save_adapter(adapter: DreamCacheAdapter, path: str, extra_metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    if not adapter.norm_folded:
        raise ValueError("This adapter's LN_m is not folded against a base model yet; call fold_norms(base) first.")
    metadata = {
        "dreamcache_format": FORMAT_NAME,
        "dreamcache_version": FORMAT_VERSION,
        "layers": json.dumps([adapter.specs[k].to_json() for k in adapter.keys()]),
        "signature": json.dumps(adapter.signature, sort_keys=True),
    }
    for k, v in (extra_metadata or {}).items():
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    save_file(adapter_state_dict(adapter), path, metadata=metadata)


def load_adapter(path: str, base_model=None) -> DreamCacheAdapter:
    """Load an adapter file: our .safetensors, or the authors' .pt (needs ``base_model`` to fold LN_m,
    or leaves it unfolded for ``fold_norms`` later when ``base_model`` is None).

    The adapter holds normal tensors even when loaded inside ComfyUI's inference mode, so it can be trained from.
    """
    with normal_tensors():
        return _load_adapter_file(path, base_model)


def _load_adapter_file(path: str, base_model) -> DreamCacheAdapter:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Adapter file not found: {path}")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return _load_safetensors(path)
    if lower.endswith((".pt", ".pth", ".ckpt", ".bin")):
        state = torch_load_safely(path)
        return adapter_from_authors_state_dict(state, base_model=base_model, source=path)
    raise AdapterFileError(
        f"{os.path.basename(path)} is neither a .safetensors adapter nor the authors' .pt checkpoint. "
        "Put a DreamCache adapter (.safetensors, or the authors' cross_attention-<step>.pt) in models/dreamcache."
    )


def _load_safetensors(path: str) -> DreamCacheAdapter:
    """Read our adapter format. Nothing is allocated from the metadata alone: the layer descriptions are
    checked against sane bounds and against the shapes of the tensors actually in the file (read from the
    header, without their data) before the adapter is built."""
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            _check_format(metadata, name)
            specs, signature = _specs_from_metadata(metadata, name)
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            check_file_shapes(specs, shapes, name)
            tensors = {k: handle.get_tensor(k) for k in expected_keys(specs)}
    except AdapterFileError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterFileError(
            f"{name} could not be read as safetensors ({error}). The file is truncated or corrupt: "
            "download or convert it again."
        ) from error
    adapter = DreamCacheAdapter(specs, signature)
    copy_into(adapter, tensors, name)
    return adapter


def _check_format(metadata: dict, name: str) -> None:
    if metadata.get("dreamcache_format") != FORMAT_NAME:
        raise AdapterFileError(
            f"{name} is a safetensors file but not a DreamCache adapter (no dreamcache_format metadata). "
            "Convert the authors' checkpoint with `python -m dreamcache_core.comfy_bridge.convert_authors` or pick "
            "an adapter file."
        )
    version = metadata.get("dreamcache_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{name} uses adapter format version {version}; this pack reads version {FORMAT_VERSION}. "
                               "Update ComfyUI-DreamCache.")


def _specs_from_metadata(metadata: dict, name: str):
    """(layer specs, signature) from our metadata, or AdapterFileError saying which field is missing or broken."""
    damaged = "The adapter's metadata is damaged: save or convert the adapter again."
    if "layers" not in metadata:
        raise AdapterFileError(f"{name} lacks the 'layers' metadata field (the memory layer descriptions). {damaged}")
    layers = read_json_field(metadata["layers"], f"{name}: the 'layers' metadata field", damaged, AdapterFileError)
    signature = read_json_field(metadata.get("signature", "{}"), f"{name}: the 'signature' metadata field", damaged,
                                AdapterFileError)
    if not isinstance(layers, list) or not layers or not isinstance(signature, dict):
        raise AdapterFileError(f"{name}: the 'layers' metadata is not a list of layers, or 'signature' is not an "
                               f"object. {damaged}")
    problem = context_width_problem(signature.get("context_dim"))
    if problem:
        raise AdapterFileError(f"{name}: the 'signature' metadata is damaged: {problem}. {damaged}")
    try:
        specs = [MemoryLayerSpec.from_json(d) for d in layers]
    except KeyError as error:
        raise AdapterFileError(f"{name}: a layer description lacks the field {error}. {damaged}") from error
    except (TypeError, ValueError, IndexError) as error:
        raise AdapterFileError(f"{name}: a layer description is malformed ({error}). {damaged}") from error
    if len({spec.key for spec in specs}) != len(specs):
        raise AdapterFileError(f"{name} describes a memory layer twice. {damaged}")
    for spec in specs:
        check_spec_bounds(spec, name)
    return specs, signature
