"""An adapter's tensors, whichever file they come from: the names and shapes each memory layer's adapter has,
the bounds a layer description must keep, and the checked copy of file tensors into a DreamCacheAdapter.

Shared by the pack's .safetensors format (``adapter_io``) and the authors' .pt (``authors_adapter_format``).
"""
from __future__ import annotations

import torch

from ..method.adapter import DreamCacheAdapter
from ..method.input_checks import check_finite_tensor
from ..method.layers import MemoryLayerSpec

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
MAX_LAYER_WIDTH = 8192  # the widest SD1.x/SD2.x/SDXL memory layer is 1280; beyond this a file is forged or damaged


class AdapterFileError(ValueError):
    """A file that cannot be read as a DreamCache adapter."""


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


def check_file_shapes(specs, shapes: dict, name: str) -> None:
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


def expected_keys(specs):
    return [f"{spec.key}.{name}" for spec in specs for name in TENSOR_NAMES]


@torch.no_grad()
def copy_into(adapter: DreamCacheAdapter, tensors: dict, source_name: str):
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
