"""The authors' released adapter format (their ``cross_attention-<step>.pt``), read and written.

A ``torch.save`` dict with keys ``diffusion_model.<layer key>.transformer_blocks.0.<suffix>`` (suffixes in
``adapter_tensors.TENSOR_NAMES``); LN_m is raw (``norm2_mem``) and must be folded against the base model's
norm1, so loading it needs the base model (or its norm1 tensors). Files are read with
``torch.load(weights_only=True)`` only, and tensors whose storage is smaller than their shape are refused.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..method.adapter import DreamCacheAdapter
from ..method import layers as method_layers  # looked up at call time: tests substitute its functions
from ..method.layers import MemoryLayerSpec, describe_layers
from .adapter_tensors import TENSOR_NAMES, AdapterFileError, check_spec_bounds, copy_into

AUTHORS_PREFIX = "diffusion_model."
AUTHORS_BLOCK = ".transformer_blocks.0."
AUTHORS_LAYER_KEY = re.compile(r"^(middle_block\.\d+|(input|output)_blocks\.\d+\.\d+)$")


def torch_load_safely(path: str) -> dict:
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


def authors_layer_keys(state: dict) -> list[str]:
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


def authors_specs_from_state_dict(state: dict, heads_by_dim_head: int = 64, source: str = "checkpoint"
                                  ) -> list[MemoryLayerSpec]:
    """Layer specs implied by an authors' checkpoint alone (SD2.x head layout: heads of 64 channels)."""
    name = os.path.basename(source)
    check_authors_tensors(state, name)
    specs = []
    for key in authors_layer_keys(state):
        if not AUTHORS_LAYER_KEY.match(key):
            raise AdapterFileError(f"{name}: '{key}' is not a U-Net transformer key (input_blocks.<i>.<j>, "
                                   "middle_block.<j> or output_blocks.<i>.<j>); the file is not an authors' "
                                   "DreamCache checkpoint.")
        prefix = f"{AUTHORS_PREFIX}{key}{AUTHORS_BLOCK}"
        to_q = state[prefix + "attn_mem.to_q.weight"]
        to_k = state.get(prefix + "attn_mem.to_k.weight")
        if to_q.dim() != 2 or to_k is None or to_k.dim() != 2:
            raise AdapterFileError(f"{name}: layer {key} lacks a 2-D attn_mem.to_q or attn_mem.to_k weight; the file "
                                   "is incomplete or not an authors' DreamCache checkpoint.")
        dim = int(to_q.shape[1])
        inner = int(to_q.shape[0])
        if inner % heads_by_dim_head != 0:
            raise AdapterFileError(
                f"{name}: layer {key} has attention width {inner}, not a multiple of {heads_by_dim_head}, so it does "
                f"not fit the head layout (heads of {heads_by_dim_head} channels, as in SD2.x) that an authors' "
                "checkpoint is read with when no base model is given. The file itself may be fine: it was made for a "
                "base with another head layout. Convert it against its base model with `python -m "
                "dreamcache_core.comfy_bridge.convert_authors --adapter <file> --base <base checkpoint>`."
            )
        parts = key.split(".")
        block = ("middle", 0) if parts[0] == "middle_block" else (
            "output" if parts[0] == "output_blocks" else "input", int(parts[1]))
        spec = MemoryLayerSpec(key, block, int(to_k.shape[1]), dim, inner // heads_by_dim_head, heads_by_dim_head)
        check_spec_bounds(spec, name)
        specs.append(spec)
    return specs


def check_authors_tensors(state: dict, name: str) -> None:
    """Every value of the adapter's layout is a tensor whose storage holds all of its elements.

    A tensor expanded with stride 0 (or any view reaching beyond its storage's length in elements) would be
    materialised at its full shape from a few bytes on disk: refused before anything is built. Tensors that
    share one storage but each fit in it are accepted (their copies cost no more than the tensors in the file).
    """
    for key, value in state.items():
        if not (isinstance(key, str) and key.startswith(AUTHORS_PREFIX) and AUTHORS_BLOCK in key):
            continue
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(f"{name}: {key} is a {type(value).__name__}, not a tensor. The file is not an "
                                   "authors' DreamCache checkpoint (or is damaged): use cross_attention-<step>.pt.")
        if value.numel() == 0:
            continue
        stored = value.untyped_storage().nbytes()
        needed = value.numel() * value.element_size()
        zero_stride = any(stride == 0 and size > 1 for stride, size in zip(value.stride(), value.shape))
        if zero_stride or stored < needed:
            raise AdapterFileError(
                f"{name}: {key} has shape {tuple(value.shape)} ({needed} bytes) but is stored in {stored} bytes "
                "(an expanded or overlapping view). Real checkpoints store every weight; this file is forged or "
                "damaged and is refused so it cannot fill the memory. Use the authors' cross_attention-<step>.pt."
            )


@dataclass
class BaseLayout:
    """What loading an authors' checkpoint needs from its base model: the memory layers, their norm1
    (to fold LN_m) and the model signature. From a live U-Net (``layout_of_model``) or read from a
    checkpoint file (``convert_authors``)."""

    specs: list
    norm1_by_key: dict
    signature: dict


def layout_of_model(model) -> BaseLayout:
    return BaseLayout(method_layers.discover_memory_layers(model), method_layers.memory_norm1(model),
                      method_layers.model_signature(model))


def adapter_from_authors_state_dict(state: dict, base_model=None, source: str = "checkpoint",
                                    layout: Optional[BaseLayout] = None) -> DreamCacheAdapter:
    """Map the authors' keys onto our adapter. With ``base_model`` (or an explicit ``layout``) the layer
    layout (heads) comes from the base and LN_m is folded against its norm1; without either the adapter
    stays unfolded, with the SD2.x head layout."""
    name = os.path.basename(source)
    check_authors_tensors(state, name)
    layer_keys = authors_layer_keys(state)
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
        specs = authors_specs_from_state_dict(state, source=source)
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
    copy_into(adapter, tensors, name)
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
