"""Small plain-torch fixtures for the CI tests (no ComfyUI)."""
import torch
import torch.nn as nn

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
