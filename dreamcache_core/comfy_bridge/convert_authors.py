"""Convert the authors' released adapter (cross_attention-<step>.pt) into this pack's .safetensors.

    python -m dreamcache_core.comfy_bridge.convert_authors --adapter cross_attention-199999.pt \
        --base v2-1_512-ema-pruned.safetensors --out ComfyUI/models/dreamcache/dreamcache_sd21.safetensors

The base checkpoint is read for three things only: the width and heads of each memory layer, the model
signature, and norm1 of each memory layer's first transformer block (LN_m is folded against it).
No ComfyUI is needed for paths; a file name that is not a path is looked up in ComfyUI's model folders
(models/dreamcache, models/checkpoints) when a ComfyUI is found. .ckpt bases are read with weights_only=True.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

from ..io.adapter_io import save_adapter
from ..io.authors_adapter_format import (BaseLayout, adapter_from_authors_state_dict, authors_layer_keys,
                                         torch_load_safely)
from ..method.layers import MemoryLayerSpec
from .model_files import resolve_model_file

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
SD1_CONTEXT_DIM = 768  # SD1.x uses 8 heads; SD2.x and SDXL use heads of 64 channels


def read_base_state_dict(path: str) -> dict:
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors.torch import load_file
        return load_file(path)
    return torch_load_safely(path)


def _unet_prefix(state: dict) -> str:
    for prefix in UNET_PREFIXES:
        if f"{prefix}input_blocks.0.0.weight" in state:
            return prefix
    raise ValueError("The base checkpoint has no U-Net weights (no input_blocks.0.0.weight). Pass the SD1.x/SD2.x/SDXL "
                     "checkpoint the adapter was trained on.")


def layout_from_checkpoint(state: dict, layer_keys: list[str]) -> BaseLayout:
    """The memory layers' specs, norm1 and the model signature, read from a base checkpoint's state dict."""
    prefix = _unet_prefix(state)
    first_conv = state[f"{prefix}input_blocks.0.0.weight"]
    context_dim = None
    specs, norms = [], {}
    for key in layer_keys:
        block0 = f"{prefix}{key}.transformer_blocks.0."
        if f"{block0}norm1.weight" not in state:
            raise ValueError(f"The base checkpoint has no transformer at {key}: the adapter was made for another "
                             "base model.")
        dim = state[f"{block0}norm1.weight"].shape[0]
        context_dim = state[f"{block0}attn2.to_k.weight"].shape[1]
        channels = state[f"{prefix}{key}.proj_in.weight"].shape[1]
        heads, dim_head = (8, dim // 8) if context_dim == SD1_CONTEXT_DIM else (dim // 64, 64)
        parts = key.split(".")
        block = ("middle", 0) if parts[0] == "middle_block" else (
            "output" if parts[0] == "output_blocks" else "input", int(parts[1]))
        specs.append(MemoryLayerSpec(key, block, int(channels), int(dim), int(heads), int(dim_head)))
        norm = nn.LayerNorm(dim)
        with torch.no_grad():
            norm.weight.copy_(state[f"{block0}norm1.weight"].float())
            norm.bias.copy_(state[f"{block0}norm1.bias"].float())
        norms[key] = norm
    signature = {"context_dim": int(context_dim), "model_channels": int(first_conv.shape[0]),
                 "in_channels": int(first_conv.shape[1]), "layers": [s.to_json() for s in specs]}
    return BaseLayout(specs, norms, signature)


def convert(adapter_path: str, base_path: str, out_path: str) -> str:
    authors_state = torch_load_safely(adapter_path)
    layer_keys = authors_layer_keys(authors_state)
    if not layer_keys:
        raise ValueError(f"{os.path.basename(adapter_path)} is not in the authors' DreamCache layout.")
    layout = layout_from_checkpoint(read_base_state_dict(base_path), layer_keys)
    adapter = adapter_from_authors_state_dict(authors_state, source=adapter_path, layout=layout)
    save_adapter(adapter, out_path, {"converted_from": os.path.basename(adapter_path),
                                     "base_checkpoint": os.path.basename(base_path)})
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the authors' cross_attention-<step>.pt: a path, or a file "
                                                         "name in ComfyUI's models/dreamcache")
    parser.add_argument("--base", required=True, help="the base checkpoint it was trained on (.safetensors or .ckpt): "
                                                      "a path, or a file name in ComfyUI's models/checkpoints")
    parser.add_argument("--out", required=True, help="where to write the .safetensors adapter")
    args = parser.parse_args(argv)
    try:
        path = convert(resolve_model_file(args.adapter, "adapter"), resolve_model_file(args.base, "checkpoint"),
                       args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
