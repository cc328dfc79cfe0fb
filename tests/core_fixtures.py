"""Small plain-torch fixtures for the CI tests (no ComfyUI)."""
import torch
import torch.nn as nn

from comfyui_dreamcache.dreamcache_core.io.authors_adapter_format import AUTHORS_BLOCK, AUTHORS_PREFIX
from comfyui_dreamcache.dreamcache_core.method.cache import DreamCache, token_masks_from_mask
from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec

TINY_SPECS = [
    MemoryLayerSpec("middle_block.1", ("middle", 0), 48, 48, 4, 12),
    MemoryLayerSpec("output_blocks.4.1", ("output", 4), 48, 48, 4, 12),
    MemoryLayerSpec("output_blocks.6.1", ("output", 6), 32, 32, 4, 8),
]
TINY_SIGNATURE = {"context_dim": 16, "model_channels": 16, "in_channels": 4,
                  "layers": [s.to_json() for s in TINY_SPECS]}

SD15_WIDTHS = [("middle_block.1", ("middle", 0), 1280), ("output_blocks.4.1", ("output", 4), 1280),
               ("output_blocks.6.1", ("output", 6), 640), ("output_blocks.8.1", ("output", 8), 640),
               ("output_blocks.10.1", ("output", 10), 320)]


def sd15_specs():
    return [MemoryLayerSpec(k, b, w, w, 8, w // 8) for k, b, w in SD15_WIDTHS]


def random_norm1(spec, seed):
    generator = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(spec.dim)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(spec.dim, generator=generator))
        norm.bias.copy_(0.3 * torch.randn(spec.dim, generator=generator))
    return norm


def random_tensor(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def authors_checkpoint(seed=0, specs=TINY_SPECS):
    """Random tensors in the authors' key layout for ``specs``."""
    state = {}
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        prefix = f"{AUTHORS_PREFIX}{spec.key}{AUTHORS_BLOCK}"
        d, c, inner = spec.dim, spec.channels, spec.heads * spec.dim_head
        shapes = {"attn_mem.to_q.weight": (inner, d), "attn_mem.to_k.weight": (inner, c),
                  "attn_mem.to_v.weight": (inner, c), "attn_mem.to_out.0.weight": (d, inner),
                  "attn_mem.to_out.0.bias": (d,), "norm2_mem.weight": (d,), "norm2_mem.bias": (d,),
                  "linear_cat.weight": (d, 2 * d), "linear_cat.bias": (d,)}
        for suffix, shape in shapes.items():
            state[prefix + suffix] = torch.randn(shape, generator=generator)
        state[prefix + "norm2_mem.weight"] = 1 + 0.2 * state[prefix + "norm2_mem.weight"]
    return state


def tiny_cache(num_refs=1, seed=0, with_mask=False):
    features = {s.key: random_tensor(num_refs, s.channels, 4, 4, seed=seed + i) for i, s in enumerate(TINY_SPECS)}
    masks = {}
    if with_mask:
        mask = torch.zeros(num_refs, 32, 32)
        mask[:, 8:24, 8:24] = 1
        masks = token_masks_from_mask(mask, {k: (num_refs, 4, 4) for k in features})
    return DreamCache(features, masks, {"signature": TINY_SIGNATURE, "seed": seed, "latent_size": [4, 4]})
