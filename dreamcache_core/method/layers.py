"""Find the DreamCache memory layers of a ComfyUI ``UNetModel``.

Plain torch: the U-Net is walked by structure (``input_blocks``,
``middle_block``, ``output_blocks``) and spatial transformers are recognised by
their ``transformer_blocks`` list, so nothing from ComfyUI is imported.

The rule (the paper's layer choice): number every spatial transformer in forward
order from 0; the memory layers are the middle one and every second decoder
one, i.e. the decoder transformers at odd positions inside the decoder
(the authors' "even global index" for SD1.5/SD2.1: 6, 8, 10, 12, 14).
Adapters sit in transformer block 0 of each memory layer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterator

import torch.nn as nn


@dataclass(frozen=True)
class MemoryLayerSpec:
    """One memory layer: where it is and the widths its adapter needs.

    key:       module path inside the U-Net, e.g. ``output_blocks.4.1``
               (the authors' checkpoint keys use the same path)
    block:     ComfyUI's name of the block, e.g. ("output", 4)
    channels:  channels of the tensor entering the spatial transformer
               (what the cache stores, the memory keys' input width)
    dim:       width of transformer block 0 (query / output width)
    heads, dim_head: attention layout of transformer block 0
    """

    key: str
    block: tuple
    channels: int
    dim: int
    heads: int
    dim_head: int

    def to_json(self) -> dict:
        data = asdict(self)
        data["block"] = list(self.block)
        return data

    @staticmethod
    def from_json(data: dict) -> "MemoryLayerSpec":
        return MemoryLayerSpec(
            key=str(data["key"]),
            block=(str(data["block"][0]), int(data["block"][1])),
            channels=int(data["channels"]),
            dim=int(data["dim"]),
            heads=int(data["heads"]),
            dim_head=int(data["dim_head"]),
        )


@dataclass(frozen=True)
class SpatialTransformerSite:
    """A spatial transformer found in forward order."""

    global_index: int
    key: str
    block: tuple
    module: nn.Module


def _is_spatial_transformer(module: nn.Module) -> bool:
    return hasattr(module, "transformer_blocks") and hasattr(module, "norm") and hasattr(module, "proj_in")


def _unet_of(model: nn.Module) -> nn.Module:
    """Accept a UNetModel, a ComfyUI BaseModel (``.diffusion_model``) or a ModelPatcher (``.model``)."""
    for _ in range(3):
        if hasattr(model, "output_blocks") and hasattr(model, "input_blocks"):
            return model
        if hasattr(model, "diffusion_model"):
            model = model.diffusion_model
        elif hasattr(model, "model"):
            model = model.model
    if hasattr(model, "output_blocks") and hasattr(model, "input_blocks"):
        return model
    raise TypeError(
        f"DreamCache needs a U-Net (SD1.x, SD2.x or SDXL); got {type(model).__name__}, which has no "
        "input_blocks/output_blocks. Connect a MODEL loaded from an SD1.5, SD2.x or SDXL checkpoint."
    )


def unet_of(model) -> nn.Module:
    return _unet_of(model)


def iter_spatial_transformers(model) -> Iterator[SpatialTransformerSite]:
    """Every spatial transformer of the U-Net, in forward order."""
    unet = _unet_of(model)
    index = 0
    sections = [("input", "input_blocks", list(unet.input_blocks))]
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        sections.append(("middle", "middle_block", [middle]))
    sections.append(("output", "output_blocks", list(unet.output_blocks)))
    for block_name, attr, blocks in sections:
        for block_id, block in enumerate(blocks):
            for child_id, child in enumerate(block):
                if _is_spatial_transformer(child):
                    key = f"{attr}.{child_id}" if block_name == "middle" else f"{attr}.{block_id}.{child_id}"
                    yield SpatialTransformerSite(index, key, (block_name, block_id), child)
                    index += 1


def _spec_for(site: SpatialTransformerSite) -> MemoryLayerSpec:
    transformer = site.module
    block0 = transformer.transformer_blocks[0]
    heads = int(block0.n_heads)
    dim_head = int(block0.d_head)
    return MemoryLayerSpec(
        key=site.key,
        block=site.block,
        channels=int(transformer.in_channels),
        dim=int(block0.norm1.normalized_shape[0]),
        heads=heads,
        dim_head=dim_head,
    )


def discover_memory_layers(model) -> list[MemoryLayerSpec]:
    """The memory layers of ``model``: the middle transformer, then every second decoder one."""
    sites = list(iter_spatial_transformers(model))
    chosen = [s for s in sites if s.block[0] == "middle"]
    decoder = [s for s in sites if s.block[0] == "output"]
    chosen += [s for position, s in enumerate(decoder) if position % 2 == 1]
    if not chosen:
        raise ValueError(
            "This U-Net has no middle or decoder spatial transformers, so DreamCache has nowhere to inject "
            "the reference. Use an SD1.x, SD2.x or SDXL model."
        )
    return [_spec_for(s) for s in chosen]


def memory_modules(model) -> dict[str, nn.Module]:
    """Layer key -> the spatial transformer module (what the Encode pass hooks)."""
    keys = {spec.key for spec in discover_memory_layers(model)}
    return {s.key: s.module for s in iter_spatial_transformers(model) if s.key in keys}


def memory_norm1(model) -> dict[str, nn.Module]:
    """Layer key -> LayerNorm ``norm1`` of transformer block 0 (needed to fold LN_m)."""
    return {key: module.transformer_blocks[0].norm1 for key, module in memory_modules(model).items()}


def model_signature(model) -> dict:
    """What identifies a base model family for adapters and caches."""
    unet = _unet_of(model)
    layers = discover_memory_layers(unet)
    context_dim = None
    for site in iter_spatial_transformers(unet):
        attn2 = getattr(site.module.transformer_blocks[0], "attn2", None)
        if attn2 is not None:
            context_dim = int(attn2.to_k.weight.shape[1])
            break
    return {
        "context_dim": context_dim,
        "model_channels": int(unet.model_channels),
        "in_channels": int(unet.in_channels),
        "layers": [spec.to_json() for spec in layers],
    }


def signature_json(signature: dict) -> str:
    return json.dumps(signature, sort_keys=True)


def describe_layers(layers) -> str:
    return ", ".join(f"{s.key} (width {s.dim}, {s.heads}x{s.dim_head} heads)" for s in layers)
