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
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..method.adapter import DreamCacheAdapter
from ..method.base_family import context_width_problem
from ..method.input_checks import check_finite_tensor, read_json_field
from ..method import layers as method_layers  # looked up at call time: tests substitute its functions
from ..method.layers import MemoryLayerSpec, describe_layers
from ..method.normal_tensors import normal_tensors

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
AUTHORS_LAYER_KEY = re.compile(r"^(middle_block\.\d+|(input|output)_blocks\.\d+\.\d+)$")
MAX_LAYER_WIDTH = 8192  # the widest SD1.x/SD2.x/SDXL memory layer is 1280; beyond this a file is forged or damaged


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
            _check_file_shapes(specs, shapes, name)
            tensors = {k: handle.get_tensor(k) for k in _expected_keys(specs)}
    except AdapterFileError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterFileError(
            f"{name} could not be read as safetensors ({error}). The file is truncated or corrupt: "
            "download or convert it again."
        ) from error
    adapter = DreamCacheAdapter(specs, signature)
    _copy_into(adapter, tensors, name)
    return adapter


def _check_format(metadata: dict, name: str) -> None:
    if metadata.get("dreamcache_format") != FORMAT_NAME:
        raise AdapterFileError(
            f"{name} is a safetensors file but not a DreamCache adapter (no dreamcache_format metadata). "
            "Convert the authors' checkpoint with `python -m dreamcache_core.io.convert_authors` or pick an adapter file."
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


def check_spec_bounds(spec: MemoryLayerSpec, name: str) -> None:
    """AdapterFileError when a layer's widths are not positive or beyond ``MAX_LAYER_WIDTH`` (a forged or
    damaged file: no SD1.x, SD2.x or SDXL layer comes near)."""
    widths = {"channels": spec.channels, "width": spec.dim, "heads": spec.heads, "dim_head": spec.dim_head,
              "heads x dim_head": spec.heads * spec.dim_head}
    bad = {k: v for k, v in widths.items() if v < 1 or v > MAX_LAYER_WIDTH}
    if bad:
        raise AdapterFileError(
            f"{name}: layer {spec.key} declares {', '.join(f'{k} {v}' for k, v in bad.items())}; every width must lie "
            f"in 1..{MAX_LAYER_WIDTH} (SD1.x, SD2.x and SDXL layers are at most 1280 wide). The file is damaged or "
            "not a DreamCache adapter: use another adapter file."
        )


def tensor_shapes(spec: MemoryLayerSpec) -> dict[str, tuple]:
    """Our tensor name -> the shape ``MemoryAdapterLayer(spec)`` gives it."""
    d, c, inner = spec.dim, spec.channels, spec.heads * spec.dim_head
    return {"mem_norm_scale": (d,), "mem_norm_shift": (d,), "to_q.weight": (inner, d), "to_k.weight": (inner, c),
            "to_v.weight": (inner, c), "to_out.weight": (d, inner), "to_out.bias": (d,),
            "linear_cat.weight": (d, 2 * d), "linear_cat.bias": (d,)}


def _check_file_shapes(specs, shapes: dict, name: str) -> None:
    """Every tensor the layer descriptions imply is in the file, with the implied shape."""
    for spec in specs:
        for tensor_name, expected in tensor_shapes(spec).items():
            key = f"{spec.key}.{tensor_name}"
            if key not in shapes:
                raise AdapterFileError(f"{name} lacks tensor {key}: the file is incomplete.")
            if shapes[key] != expected:
                raise AdapterFileError(
                    f"{name}: tensor {key} has shape {shapes[key]}, expected {expected} from the layer description. "
                    "The file is damaged: save or convert the adapter again."
                )


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
            check_finite_tensor(tensor, f"{source_name}: tensor {key}.{name}",
                                "The adapter file is damaged or comes from a diverged training run: use another "
                                "checkpoint.", AdapterFileError)
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


def authors_specs_from_state_dict(state: dict, heads_by_dim_head: int = 64, source: str = "checkpoint"
                                  ) -> list[MemoryLayerSpec]:
    """Layer specs implied by an authors' checkpoint alone (SD2.x head layout: heads of 64 channels)."""
    name = os.path.basename(source)
    check_authors_tensors(state, name)
    specs = []
    for key in _authors_layer_keys(state):
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
                "dreamcache_core.io.convert_authors --adapter <file> --base <base checkpoint>`."
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
