"""Capture the memory-layer inputs of one U-Net pass (plain torch).

Forward pre-hooks on the memory layers' spatial transformers record the tensor
entering each one ([B, C, h, w], before its GroupNorm). The hooks are removed
when the pass ends, whether it succeeded or raised.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .cache import DreamCache, token_masks_from_mask
from .input_checks import check_finite_tensor
from .layers import discover_memory_layers, memory_modules, model_signature


def capture_memory_inputs(model, run_pass: Callable[[], Any]) -> dict:
    """Run ``run_pass()`` once with pre-hooks on the memory layers; return key -> captured input."""
    captured: dict = {}
    handles = []

    def make_hook(key):
        def hook(module, args):
            if key not in captured:
                captured[key] = args[0].detach()
        return hook

    try:
        for key, module in memory_modules(model).items():
            handles.append(module.register_forward_pre_hook(make_hook(key)))
        run_pass()
    finally:
        for handle in handles:
            handle.remove()
    expected = [s.key for s in discover_memory_layers(model)]
    missing = [k for k in expected if k not in captured]
    if missing:
        raise RuntimeError(f"The U-Net pass never reached memory layers {missing}; another patch on this MODEL "
                           "skips them. Encode with a MODEL whose U-Net runs every block.")
    return {k: captured[k] for k in expected}


def cache_from_features(model, features: dict, mask: Optional[torch.Tensor] = None, metadata: Optional[dict] = None) -> DreamCache:
    """Wrap captured features (and an optional subject mask) into a DreamCache for ``model``."""
    token_masks = {}
    if mask is not None:
        sizes = {k: (v.shape[0], v.shape[2], v.shape[3]) for k, v in features.items()}
        token_masks = token_masks_from_mask(mask, sizes)
    meta = {"signature": model_signature(model)}
    meta.update(metadata or {})
    cache = DreamCache(features, token_masks, meta)
    for key, feature in cache.features.items():  # after the fp16 storage cast: values beyond 65504 overflow it
        check_finite_tensor(feature, f"The features the U-Net gave memory layer {key}",
                            "The model or a patch on it (a LoRA at too high a strength?) produces non-finite values "
                            "on this reference: check them with a plain sample first.")
    return cache
