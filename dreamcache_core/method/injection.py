"""The one builder of a DreamCache injection from what an artist sets (``controls.Controls``).

Apply DreamCache, the DreamCache Guider, headless generation, the benchmarks and the training loss all build
their ``DreamCacheInjection`` here (through ``comfy_bridge.build_injection``, which adds ComfyUI's attention
and memory manager), so the checks (adapter and cache against the model), the sampling window (start/end
percent -> sigmas), the per-layer strengths, the region mask and the reference mode mean the same everywhere.
``model`` is a ComfyUI ModelPatcher, used only through its duck-typed accessors (``get_model_object``);
nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, Optional

from .adapter import adapter_for_model, multihead_attention
from .cache import DreamCache, check_cache_fits, parse_reference_weights
from .controls import Controls, layer_strengths
from .input_checks import GROUP_WEIGHT_RANGE, PERCENT_RANGE, STRENGTH_RANGE, check_number
from .layers import discover_memory_layers, model_signature
from .patch import POSITIVE_CHUNK, DreamCacheInjection
from .schedules import CONSTANT_SCHEDULE, StepSchedule, parse_frame_weights


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of the window in which the injection is active, from sampling percents."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); both lie in 0..1.")
    model_sampling = model.get_model_object("model_sampling")
    sigma_start = math.inf if start_percent <= 0.0 else float(model_sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(model_sampling.percent_to_sigma(end_percent))
    return sigma_start, sigma_end


def build_injection(model, adapter, cache: DreamCache, controls: Controls = Controls(),
                    chunks: Optional[Iterable[int]] = (POSITIVE_CHUNK,), *, reuse_memory_kv: bool = True,
                    attention=multihead_attention, cache_role: str = "cache") -> DreamCacheInjection:
    """Check ``adapter`` and ``cache`` against ``model`` and build the injection (not attached yet) with what
    the artist set (``controls``), into the batch chunks ``chunks`` (None: every chunk).

    reuse_memory_kv: project the memory keys/values once per run instead of once per step.
    attention: the memory attention (``multihead_attention`` in plain torch; ``comfy_bridge.build_injection``
    passes ComfyUI's optimized attention, what the U-Net itself uses).
    cache_role: the input ``cache`` came through, for messages ("cache", or "negative_cache").
    """
    c = controls
    for name, value, (low, high) in (("strength", c.strength, STRENGTH_RANGE),
                                     ("start_percent", c.start_percent, PERCENT_RANGE),
                                     ("end_percent", c.end_percent, PERCENT_RANGE),
                                     ("middle_weight", c.middle_weight, GROUP_WEIGHT_RANGE),
                                     ("decoder_weight", c.decoder_weight, GROUP_WEIGHT_RANGE)):
        # the documented ranges, also for callers outside the nodes: 1e30 is finite but overflows the sample
        check_number(value, name, low, high)
    unet = model.get_model_object("diffusion_model")
    ready_adapter = adapter_for_model(adapter, unet)
    specs = discover_memory_layers(unet)
    check_cache_fits(cache, specs, model_signature(unet), cache_role)
    sigma_start, sigma_end = sigma_range(model, c.start_percent, c.end_percent)
    reference_weights = c.reference_weights
    if isinstance(reference_weights, str):
        reference_weights = parse_reference_weights(reference_weights, cache.num_references)
    strengths = layer_strengths(specs, c.middle_weight, c.decoder_weight, c.layer_weights, c.layer_preset)
    step_schedule = None
    if c.weight_schedule != CONSTANT_SCHEDULE:
        step_schedule = StepSchedule(c.weight_schedule, c.start_percent, c.end_percent,
                                     model.get_model_object("model_sampling").percent_to_sigma)
    frame_weights = c.frame_weights
    if isinstance(frame_weights, str):
        frame_weights = parse_frame_weights(frame_weights)
    return DreamCacheInjection(ready_adapter, cache, c.strength, sigma_start, sigma_end, chunks,
                               layer_strengths={k: v for k, v in strengths.items() if v != 1.0},
                               reuse_memory_kv=reuse_memory_kv, attention=attention, region_mask=c.region_mask,
                               reference_mode=c.reference_mode, reference_weights=reference_weights,
                               step_schedule=step_schedule, frame_weights=frame_weights)


def build_injections(model, adapter, cache: DreamCache, controls: Controls = Controls(),
                     negative_cache: Optional[DreamCache] = None, chunks: Iterable[int] = (POSITIVE_CHUNK,),
                     negative_chunks: Iterable[int] = (), **options) -> list[DreamCacheInjection]:
    """The reference's injection and, with ``negative_cache``, a negative reference's (sharing one adapter;
    ``comfy_bridge.build_injections`` hands them to ComfyUI's memory manager together).

    The negative reference is injected into ``negative_chunks`` (the batch rows of the negative prompt, or the
    combined guider's unconditional branch) instead of no reference, with the same strength, window,
    schedules, layers and region as the reference; its references are shared (their union, with the
    negative cache's own weights). ``options`` are ``build_injection``'s keyword-only arguments.
    """
    positive = build_injection(model, adapter, cache, controls, chunks, **options)
    injections = [positive]
    if negative_cache is not None:
        negative_chunks = frozenset(int(c) for c in negative_chunks)
        if not negative_chunks or positive.chunks is None or positive.chunks & negative_chunks:
            raise ValueError(f"The negative reference needs batch chunks of its own: the reference is injected into "
                             f"{'every chunk' if positive.chunks is None else sorted(positive.chunks)}, the negative "
                             f"reference into {sorted(negative_chunks)}.")
        negative_controls = replace(controls, reference_mode="shared", reference_weights=None)
        injections.append(build_injection(model, positive.adapter, negative_cache, negative_controls, negative_chunks,
                                          cache_role="negative_cache", **options))
    return injections
