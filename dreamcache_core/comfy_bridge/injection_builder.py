"""An injection for a ComfyUI model: ``method.injection``'s builders with ComfyUI's attention, and the adapter
handed to ComfyUI's memory manager.

Every caller holds a ComfyUI ModelPatcher. ``build_injection`` / ``build_injections`` run the method's checks
and build the injection with ``comfy_memory_attention`` (what the U-Net itself uses) unless another attention
is given; ``memory_managed`` (and always ``build_injections``) gives ComfyUI's memory manager the adapter as a
ModelPatcher, sized with the memory keys/values the injections hold, so it is loaded and offloaded with the
model. Training keeps its adapter itself and leaves ``memory_managed`` off.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ..method import injection as method_injection
from ..method.cache import DreamCache
from ..method.controls import Controls
from ..method.patch import POSITIVE_CHUNK, DreamCacheInjection
from .attention import comfy_memory_attention
from .models import adapter_model_patcher


def build_injection(model, adapter, cache: DreamCache, controls: Controls = Controls(),
                    chunks: Optional[Iterable[int]] = (POSITIVE_CHUNK,), *, attention=None,
                    memory_managed: bool = False, **options) -> DreamCacheInjection:
    """``method.injection.build_injection`` (``options``: its other keyword-only arguments) with ComfyUI's
    attention by default; ``memory_managed`` hands the adapter to ComfyUI's memory manager (nodes and generation
    set it)."""
    injection = method_injection.build_injection(
        model, adapter, cache, controls, chunks,
        attention=comfy_memory_attention if attention is None else attention, **options)
    if memory_managed:
        hand_to_memory_manager(model, [injection])
    return injection


def build_injections(model, adapter, cache: DreamCache, controls: Controls = Controls(),
                     negative_cache: Optional[DreamCache] = None, chunks: Iterable[int] = (POSITIVE_CHUNK,),
                     negative_chunks: Iterable[int] = (), *, attention=None, **options) -> list[DreamCacheInjection]:
    """``method.injection.build_injections`` (the reference's injection and a negative reference's) with
    ComfyUI's attention by default, handed to ComfyUI's memory manager together (one adapter, their memories
    counted together)."""
    injections = method_injection.build_injections(
        model, adapter, cache, controls, negative_cache, chunks, negative_chunks,
        attention=comfy_memory_attention if attention is None else attention, **options)
    hand_to_memory_manager(model, injections)
    return injections


def hand_to_memory_manager(model, injections: Sequence[DreamCacheInjection]) -> None:
    """Give ComfyUI's memory manager ONE ModelPatcher of the adapter the ``injections`` share (a reference and
    a negative reference), sized with the device memory all of them hold; the first injection carries it."""
    adapters = {id(injection.adapter) for injection in injections}
    if len(adapters) != 1:
        raise ValueError("Injections handed to the memory manager together must share one adapter.")
    dtype = model.model_dtype() or torch.float32
    extra = sum(injection.device_memory_bytes(dtype) for injection in injections)
    patcher = adapter_model_patcher(injections[0].adapter, extra)  # the adapter's one patcher, sized for these
    injections[0].managed_models = [patcher]
    injections[0].managed_size = patcher.size
    for injection in injections[1:]:
        injection.managed_models = []
