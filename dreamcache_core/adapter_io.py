"""Adapter files: the pack's .safetensors format and the authors' released .pt.

Our format: tensors ``<layer key>.<name>`` (names below) with metadata
``dreamcache_format`` = "adapter", ``dreamcache_version``, ``layers`` (JSON
list of MemoryLayerSpec) and ``signature`` (JSON base-model signature).
``mem_norm_scale`` / ``mem_norm_shift`` are LN_m folded against norm1.

The authors' format: a ``torch.save`` dict with keys
``diffusion_model.<layer key>.transformer_blocks.0.<suffix>``; LN_m is raw
(``norm2_mem``) and must be folded against the base model's norm1, so loading
it needs the base model (or its norm1 tensors).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .adapter import DreamCacheAdapter
from .layers import MemoryLayerSpec, describe_layers
from .normal_tensors import normal_tensors

FORMAT_NAME = "adapter"
FORMAT_VERSION = "1"

# our tensor name -> (parameter path inside MemoryAdapterLayer, authors' suffix)
TENSOR_NAMES = {
    "mem_norm_scale": ("mem_norm_scale", "norm2_mem.weight"),
    "mem_norm_shift": ("mem_norm_shift", "norm2_mem.bias"),
    "to_q.weight": ("to_q.weight", "attn_mem.to_q.weight"),
    "to_k.weight": ("to_k.weight", "attn_mem.to_k.weight"),
    "to_v.weight": ("to_v.weight", "attn_mem.to_v.weight"),
    "to_out.weight": ("to_out.weight", "attn_mem.to_out.0.weight"),
    "to_out.bias": ("to_out.bias", "attn_mem.to_out.0.bias"),
    "linear_cat.weight": ("linear_cat.weight", "linear_cat.weight"),
    "linear_cat.bias": ("linear_cat.bias", "linear_cat.bias"),
}
AUTHORS_PREFIX = "diffusion_model."
AUTHORS_BLOCK = ".transformer_blocks.0."


class AdapterFileError(ValueError):
    """A file that cannot be read as a DreamCache adapter."""


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
        state = _torch_load_safely(path)
        return adapter_from_authors_state_dict(state, base_model=base_model, source=path)
    raise AdapterFileError(
        f"{os.path.basename(path)} is neither a .safetensors adapter nor the authors' .pt checkpoint. "
        "Put a DreamCache adapter (.safetensors, or the authors' cross_attention-<step>.pt) in models/dreamcache."
    )


def _load_safetensors(path: str) -> DreamCacheAdapter:
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterFileError(
            f"{name} could not be read as safetensors ({error}). The file is truncated or corrupt: "
            "download or convert it again."
        ) from error
    if metadata.get("dreamcache_format") != FORMAT_NAME:
        raise AdapterFileError(
            f"{name} is a safetensors file but not a DreamCache adapter (no dreamcache_format metadata). "
            "Convert the authors' checkpoint with `python -m dreamcache_core.convert_authors` or pick an adapter file."
        )
    version = metadata.get("dreamcache_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{name} uses adapter format version {version}; this pack reads version {FORMAT_VERSION}. "
                               "Update ComfyUI-DreamCache.")
    specs = [MemoryLayerSpec.from_json(d) for d in json.loads(metadata["layers"])]
    adapter = DreamCacheAdapter(specs, json.loads(metadata.get("signature", "{}")))
    _copy_into(adapter, {k: tensors.get(k) for k in _expected_keys(specs)}, name)
    return adapter


def _expected_keys(specs):
    return [f"{spec.key}.{name}" for spec in specs for name in TENSOR_NAMES]


@torch.no_grad()
def _copy_into(adapter: DreamCacheAdapter, tensors: dict, source_name: str):
    for key in adapter.keys():
        params = dict(adapter.layer(key).named_parameters())
        for name, (path, _) in TENSOR_NAMES.items():
            tensor = tensors.get(f"{key}.{name}")
            if tensor is None:
                raise AdapterFileError(f"{source_name} lacks tensor {key}.{name}: the file is incomplete.")
            if tuple(tensor.shape) != tuple(params[path].shape):
                raise AdapterFileError(
                    f"{source_name}: tensor {key}.{name} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(params[path].shape)} from the layer description."
                )
            params[path].copy_(tensor.float())


def _torch_load_safely(path: str) -> dict:
    name = os.path.basename(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise AdapterFileError(
            f"{name} cannot be loaded safely: it is corrupt, or it needs pickle (weights_only=True refused it: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}). DreamCache never unpickles "
            "code; use the authors' cross_attention-<step>.pt or a .safetensors adapter."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AdapterFileError(f"{name} does not hold a dictionary of tensors; it is not a DreamCache adapter.")
    return state


def _authors_layer_keys(state: dict) -> list[str]:
    keys = set()
    for k in state:
        if k.startswith(AUTHORS_PREFIX) and AUTHORS_BLOCK in k and k.endswith("attn_mem.to_q.weight"):
            keys.add(k[len(AUTHORS_PREFIX):k.index(AUTHORS_BLOCK)])
    return sorted(keys, key=_layer_order)


def _layer_order(key: str):
    parts = key.split(".")
    section = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(parts[0], 3)
    number = int(parts[1]) if section != 1 and len(parts) > 1 and parts[1].isdigit() else 0
    return section, number


def authors_specs_from_state_dict(state: dict, heads_by_dim_head: int = 64) -> list[MemoryLayerSpec]:
    """Layer specs implied by an authors' checkpoint alone (SD2.x head layout: heads of 64 channels)."""
    specs = []
    for key in _authors_layer_keys(state):
        prefix = f"{AUTHORS_PREFIX}{key}{AUTHORS_BLOCK}"
        to_q = state[prefix + "attn_mem.to_q.weight"]
        to_k = state[prefix + "attn_mem.to_k.weight"]
        dim = int(to_q.shape[1])
        inner = int(to_q.shape[0])
        parts = key.split(".")
        block = ("middle", 0) if parts[0] == "middle_block" else (
            "output" if parts[0] == "output_blocks" else "input", int(parts[1]))
        specs.append(MemoryLayerSpec(key, block, int(to_k.shape[1]), dim, inner // heads_by_dim_head, heads_by_dim_head))
    return specs


@dataclass
class BaseLayout:
    """What loading an authors' checkpoint needs from its base model: the memory layers, their norm1
    (to fold LN_m) and the model signature. From a live U-Net (``layout_of_model``) or read from a
    checkpoint file (``convert_authors``)."""

    specs: list
    norm1_by_key: dict
    signature: dict


def layout_of_model(model) -> BaseLayout:
    from .layers import discover_memory_layers, memory_norm1, model_signature

    return BaseLayout(discover_memory_layers(model), memory_norm1(model), model_signature(model))


def adapter_from_authors_state_dict(state: dict, base_model=None, source: str = "checkpoint",
                                    layout: Optional[BaseLayout] = None) -> DreamCacheAdapter:
    """Map the authors' keys onto our adapter. With ``base_model`` (or an explicit ``layout``) the layer
    layout (heads) comes from the base and LN_m is folded against its norm1; without either the adapter
    stays unfolded, with the SD2.x head layout."""
    name = os.path.basename(source)
    layer_keys = _authors_layer_keys(state)
    if not layer_keys:
        raise AdapterFileError(
            f"{name} is not in the authors' DreamCache layout (no 'diffusion_model.<layer>.transformer_blocks.0."
            "attn_mem.*' keys). Use the authors' cross_attention-<step>.pt or one of our .safetensors adapters."
        )
    if layout is None and base_model is not None:
        layout = layout_of_model(base_model)
    if layout is not None:
        model_specs = {s.key: s for s in layout.specs}
        missing = [k for k in layer_keys if k not in model_specs]
        if missing:
            raise AdapterFileError(
                f"{name} has adapters for layers {missing} that this base model does not have as memory layers "
                f"({describe_layers(model_specs.values())}). It was made for another base model."
            )
        specs = [model_specs[k] for k in layer_keys]
        signature = layout.signature
    else:
        specs = authors_specs_from_state_dict(state)
        signature = {}
    adapter = DreamCacheAdapter(specs, signature, norm_folded=False)
    tensors = {}
    for spec in specs:
        prefix = f"{AUTHORS_PREFIX}{spec.key}{AUTHORS_BLOCK}"
        for our_name, (_, authors_suffix) in TENSOR_NAMES.items():
            tensor = state.get(prefix + authors_suffix)
            if tensor is not None and not isinstance(tensor, torch.Tensor):
                raise AdapterFileError(f"{name}: {prefix + authors_suffix} is not a tensor.")
            tensors[f"{spec.key}.{our_name}"] = tensor
    _copy_into(adapter, tensors, name)
    if layout is not None:
        adapter.fold_norms(layout.norm1_by_key)
    return adapter


@torch.no_grad()
def authors_state_dict(adapter: DreamCacheAdapter, norm1_by_key: dict) -> dict[str, torch.Tensor]:
    """Write a folded adapter back in the authors' key layout (LN_m unfolded against ``norm1_by_key``)."""
    out = {}
    for key in adapter.keys():
        params = dict(adapter.layer(key).named_parameters())
        prefix = f"{AUTHORS_PREFIX}{key}{AUTHORS_BLOCK}"
        for our_name, (path, authors_suffix) in TENSOR_NAMES.items():
            out[prefix + authors_suffix] = params[path].detach().float().cpu().clone()
        if adapter.norm_folded:
            gamma_1 = norm1_by_key[key].weight.detach().float().cpu()
            beta_1 = norm1_by_key[key].bias.detach().float().cpu()
            scale, shift = out[prefix + "norm2_mem.weight"], out[prefix + "norm2_mem.bias"]
            gamma_m = scale * gamma_1
            out[prefix + "norm2_mem.weight"] = gamma_m
            out[prefix + "norm2_mem.bias"] = shift + scale * beta_1
    return out
