"""The memory attention through ComfyUI's optimized attention (the one the U-Net itself uses)."""
from __future__ import annotations

from typing import Optional

import torch


def comfy_memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Memory attention through ComfyUI's optimized attention (the one the U-Net itself uses).

    Same contract as ``adapter.multihead_attention``: k, v may have batch 1 and are broadcast.
    """
    import comfy.ldm.modules.attention as comfy_attention

    batch = q.shape[0]
    if k.shape[0] != batch:
        k = k.expand(batch, -1, -1)
        v = v.expand(batch, -1, -1)
    if key_mask is None:
        return comfy_attention.optimized_attention(q, k, v, heads)
    mask = key_mask.to(torch.bool) if not key_mask.is_floating_point() else key_mask.to(q.dtype)  # float = additive bias
    mask = mask.expand(batch, -1)[:, None, None, :]
    return comfy_attention.optimized_attention_masked(q, k, v, heads, mask=mask)
