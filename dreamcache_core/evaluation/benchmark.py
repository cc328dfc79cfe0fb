"""What DreamCache costs: per-step overhead, Encode pass, memory and file sizes.

    python -m dreamcache_core.evaluation.benchmark [--comfyui PATH] [--shape mid] [--full] [--json out.json] [--markdown out.md]

Everything runs through ComfyUI's real sampling code (``CFGGuider`` ->
``sampling_function`` -> ``calc_cond_batch`` -> ``apply_model``), on U-Nets
with ComfyUI's own SD1.5 / SDXL architectures and seeded random weights (no
checkpoint is needed, nothing downloads):

* **Per step.** The same base model, unpatched (A) and personalised (B: a
  random adapter and a cache of one reference, injected into the positive
  chunk only, i.e. the paper's joint guidance with the stock KSampler), samples
  the same latent with classifier-free guidance (a batch of 2 per step:
  positive and negative). Runs alternate A, B, B, A, ... so that slow machine
  drift cancels; every model call is timed. The overhead is the median over
  pairs of adjacent runs of (median step time of B) / (median step time of A).
* **Encode.** ``comfy_bridge.encode_reference`` (the Encode DreamCache node:
  one U-Net pass at t = 1 plus the feature capture) against the same one-pass
  path on the unpatched model without capture (a plain step of a single
  latent through the same guider), alternating the same way.
* **Memory.** The peak during each sampling run, absolute: GPU
  ``torch.cuda.max_memory_allocated``; CPU the process's peak resident set size
  (Linux: the kernel's VmHWM, reset before each run; elsewhere sampled every
  millisecond). The personalised model's extra is the median over run pairs.
* **Sizes.** Bytes of the cache per reference (fp16 features as saved), of the
  adapter (fp32 as saved, and fp16), and of the memory keys/values the
  injection keeps for the whole run.

Shapes: ``mid`` (default) is the SD1.5 layout at width 96 (SD1.5: 320) on a
32x32 latent, so tokens per channel at the top level (10.7) are close to SD1.5 at
512x512 (12.8), and a step takes about half a second on a 2-core CPU; ``tiny`` is for tests; ``--full`` adds the
real SD1.5 at 512x512 and SDXL at 1024x1024 (random weights: made for a GPU).
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..comfy_bridge.models import random_model
from ..io.memory_probes import PeakMemory
from ..method.controls import Controls
from ..comfy_bridge.sampling import (schedule_sigmas, sample_timed as bridge_sample_timed,
                                     prepare_noise)
from ..comfy_bridge import (build_injection, attach_injection, encode_sigma, single_model_pass, encode_reference,
                            ensure_comfyui)
from ..io.adapter_io import adapter_state_dict
from ..method.adapter import build_adapter
from ..method.layers import discover_memory_layers, model_signature
from .benchmark_report import command_line, environment_info, markdown_table, report_results
from .benchmark_shapes import FULL_SHAPES, SHAPES, Shape

# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------

def median(values):
    return float(statistics.median(values)) if values else float("nan")


def spread(values) -> dict:
    """min, quartiles and max of ``values``."""
    if not values:
        return {"min": float("nan"), "q1": float("nan"), "median": float("nan"), "q3": float("nan"), "max": float("nan")}
    ordered = sorted(float(v) for v in values)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"min": ordered[0], "q1": q1, "median": float(statistics.median(ordered)), "q3": q3, "max": ordered[-1]}


def paired_ratios(a_runs: list, b_runs: list) -> list:
    """Ratio of B to A for each pair of adjacent runs (each run: a list of step times)."""
    return [median(b) / median(a) for a, b in zip(a_runs, b_runs)]


def ab_order(repeats: int) -> list:
    """A, B, B, A, A, B, ...: each configuration goes first in half of the pairs (drift cancels)."""
    order = []
    for r in range(repeats):
        order += ["A", "B"] if r % 2 == 0 else ["B", "A"]
    return order


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# models (ComfyUI imported lazily)
# ----------------------------------------------------------------------------------------------------------------

def conditioning(shape: Shape, seed: int):
    """A CONDITIONING of random text embeddings (SDXL: plus the pooled vector and size conditioning)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, shape.tokens, shape.unet["context_dim"], generator=generator)
    extras = {}
    if shape.family == "sdxl":
        side = shape.latent * 8
        extras = {"pooled_output": torch.randn(1, 1280, generator=generator), "width": side, "height": side,
                  "target_width": side, "target_height": side}
    return [[context, extras]]


def personalise(model_patcher, adapter, cache, chunks=(0,)):
    """What Apply DreamCache does: a clone carrying the injection (ComfyUI's optimized memory attention)."""
    injection = build_injection(model_patcher, adapter, cache, Controls(strength=1.0), chunks)
    return attach_injection(model_patcher.clone(), injection), injection


def sample_timed(model_patcher, positive, negative, latent, sigmas, cfg, seed, device) -> list:
    """One sampling run through CFGGuider; returns the time of each model call (each step)."""
    return bridge_sample_timed(model_patcher, positive, negative, latent, sigmas, cfg, seed, lambda: synchronize(device))


def plain_single_pass(model_patcher, latent, cond, seed, device) -> float:
    """Wall time of one plain model call on ``latent`` through the Encode pass's own path (no capture)."""
    noise = prepare_noise(latent, seed)
    sigma = torch.tensor([encode_sigma(model_patcher)])
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        single_model_pass(model_patcher, latent, noise, cond, sigma, seed)
    synchronize(device)
    return time.perf_counter() - start


def counted_flops(run: Callable[[], object], gradients: bool = False) -> int:
    """Floating-point operations of ``run()`` as torch's FlopCounterMode counts them (matmuls, convolutions,
    attention): a machine-independent measure beside the wall times. ``gradients``: run with autograd on, so
    that a backward pass inside ``run`` is counted too."""
    from torch.utils import flop_counter

    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                     **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    # torch's counter knows the GPU attention kernels but not the CPU ones ComfyUI's PyTorch attention uses there
    custom = {}
    for name, count in (("_scaled_dot_product_flash_attention_for_cpu", cpu_attention_flops),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", cpu_attention_backward_flops)):
        kernel = getattr(torch.ops.aten, name, None)
        if kernel is not None:
            custom[kernel] = count
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=custom)
    with counter, (torch.enable_grad() if gradients else torch.no_grad()):
        run()
    return int(counter.get_total_flops())


def adapter_step_flops(injection, rows: int) -> int:
    """The adapter's extra floating-point operations (2 per multiply-add) per model call, from the shapes
    alone, for ``rows`` personalised batch rows generating at the reference's size, memory keys and values
    reused: per memory layer of width d and inner width i (heads x head size), with L query tokens and M
    memory tokens, W_q and W_o (2 d i), W_cat (2 d^2) per token, and q k^T plus attention x v (2 L M i)."""
    total = 0
    for key in injection.adapter.keys():
        spec = injection.adapter.specs[key]
        features = injection.cache.features[key]
        queries = features.shape[-2] * features.shape[-1]
        memory = injection.cache.memory_tokens(key).shape[1]
        inner = spec.heads * spec.dim_head
        total += 2 * rows * (queries * (2 * spec.dim * inner + 2 * spec.dim * spec.dim) + 2 * queries * memory * inner)
    return total


def timed_encode(model_patcher, latent, cond, seed, device, mask=None):
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        cache = encode_reference(model_patcher, latent, cond, seed, mask)
    synchronize(device)
    return time.perf_counter() - start, cache


# ----------------------------------------------------------------------------------------------------------------
# the benchmark of one shape
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class BenchmarkSettings:
    steps: int = 6
    repeats: int = 5
    warmup: int = 1
    cfg: float = 7.5
    seed: int = 0
    subject_fraction: float = 1.0  # fraction of reference tokens kept as memory (1 = unmasked: the worst case)
    apply_to: str = "positive"  # "positive" (joint guidance) or "both"


def center_mask(side: int, fraction: float) -> torch.Tensor:
    """A centred square subject mask covering about ``fraction`` of a side x side latent image (pixels: 8x)."""
    pixels = side * 8
    inner = max(8, int(round(pixels * math.sqrt(fraction))))
    mask = torch.zeros(1, pixels, pixels)
    start = (pixels - inner) // 2
    mask[:, start:start + inner, start:start + inner] = 1.0
    return mask


def benchmark_shape(shape: Shape, device: torch.device, dtype: torch.dtype, settings: BenchmarkSettings,
                    log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark for one shape; returns a JSON-ready dict."""
    build_start = time.perf_counter()
    model = random_model(shape.family, shape.unet, settings.seed, dtype, device)
    unet = model.model.diffusion_model
    specs = discover_memory_layers(unet)
    adapter = build_adapter(specs, model_signature(unet)).randomize_(seed=settings.seed + 1, scale=0.5)
    unet_params = sum(p.numel() for p in unet.parameters())
    log(f"[{shape.name}] built {shape.description}: {unet_params / 1e6:.1f}M U-Net parameters, "
        f"{adapter.parameter_count() / 1e6:.2f}M adapter parameters ({time.perf_counter() - build_start:.1f} s)")

    generator = torch.Generator().manual_seed(settings.seed + 2)
    reference = torch.randn(1, 4, shape.latent, shape.latent, generator=generator)
    latent = torch.zeros(1, 4, shape.latent, shape.latent)
    positive, negative, empty = conditioning(shape, 10), conditioning(shape, 11), conditioning(shape, 12)
    mask = None if settings.subject_fraction >= 1.0 else center_mask(shape.latent, settings.subject_fraction)

    # --- Encode vs one plain pass, alternating ---------------------------------------------------------------
    encode_times, plain_times = [], []
    cache = None
    for _ in range(settings.warmup):
        plain_single_pass(model, reference, empty, settings.seed, device)
        _, cache = timed_encode(model, reference, empty, settings.seed, device, mask)
    for label in ab_order(settings.repeats):
        if label == "A":
            plain_times.append(plain_single_pass(model, reference, empty, settings.seed, device))
        else:
            seconds, cache = timed_encode(model, reference, empty, settings.seed, device, mask)
            encode_times.append(seconds)
    encode_ratios = [e / p for e, p in zip(encode_times, plain_times)]
    log(f"[{shape.name}] encode {median(encode_times):.3f} s vs plain pass {median(plain_times):.3f} s")

    # --- per step: unpatched (A) vs personalised (B), alternating ---------------------------------------------
    chunks = (0,) if settings.apply_to == "positive" else None
    personalised, injection = personalise(model, adapter, cache, chunks)
    sigmas = schedule_sigmas(model, "normal", settings.steps).cpu()
    runs = {"A": [], "B": []}
    peaks = {"A": [], "B": []}
    models = {"A": model, "B": personalised}
    for label in ("A", "B") * settings.warmup:
        sample_timed(models[label], positive, negative, latent, sigmas, settings.cfg, settings.seed, device)
    for label in ab_order(settings.repeats):
        gc.collect()
        with PeakMemory(device) as probe:
            steps = sample_timed(models[label], positive, negative, latent, sigmas, settings.cfg, settings.seed, device)
        runs[label].append(steps)
        peaks[label].append(probe.peak_bytes)
    # --- the same comparisons in counted floating-point operations (one step; machine-independent) -------------
    one_step = sigmas[:2]
    step_flops = {label: counted_flops(lambda m=models[label]: sample_timed(
        m, positive, negative, latent, one_step, settings.cfg, settings.seed, device)) for label in ("A", "B")}
    encode_flops = counted_flops(lambda m=model: timed_encode(m, reference, empty, settings.seed, device, mask))
    plain_flops = counted_flops(lambda m=model: plain_single_pass(m, reference, empty, settings.seed, device))
    step_ratios = paired_ratios(runs["A"], runs["B"])
    all_a = [t for run in runs["A"] for t in run]
    all_b = [t for run in runs["B"] for t in run]
    log(f"[{shape.name}] step {median(all_a) * 1000:.1f} ms unpatched, {median(all_b) * 1000:.1f} ms personalised, "
        f"overhead {100 * (median(step_ratios) - 1):+.1f} %")

    adapter_params = adapter.parameter_count()
    adapter_file_bytes = sum(t.numel() * t.element_size() for t in adapter_state_dict(adapter).values())
    result = {
        "shape": shape.name,
        "description": shape.description,
        "family": shape.family,
        "image_size": shape.latent * 8,
        "latent": [4, shape.latent, shape.latent],
        "model_channels": shape.unet["model_channels"],
        "unet_parameters": unet_params,
        "memory_layers": [spec.to_json() for spec in specs],
        "memory_tokens": int(sum(cache.memory_tokens(k).shape[1] for k in cache.keys)),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "settings": dict(settings.__dict__),
        "step_seconds": {"unpatched": spread(all_a), "personalised": spread(all_b)},
        "step_ratio": spread(step_ratios),
        "step_overhead_percent": 100.0 * (median(step_ratios) - 1.0),
        "step_runs": {"unpatched": runs["A"], "personalised": runs["B"]},
        "step_flops": {"unpatched": step_flops["A"], "personalised": step_flops["B"]},
        "step_flops_ratio": step_flops["B"] / step_flops["A"],
        "adapter_step_flops_expected": adapter_step_flops(injection, rows=1 if chunks else 2),
        "encode_flops": encode_flops,
        "plain_pass_flops": plain_flops,
        "encode_seconds": spread(encode_times),
        "plain_pass_seconds": spread(plain_times),
        "encode_ratio": spread(encode_ratios),
        "encode_vs_cfg_step": median(encode_times) / median(all_a),
        "peak_memory_kind": PeakMemory(device).kind,
        "peak_memory_bytes": {"unpatched": spread(peaks["A"]), "personalised": spread(peaks["B"])},
        "peak_memory_extra_bytes": median([b - a for a, b in zip(peaks["A"], peaks["B"])]),
        "cache_bytes_per_reference": cache.nbytes() // max(cache.num_references, 1),
        "memory_kv_bytes": injection.memory_kv_bytes(dtype),
        "adapter_parameters": adapter_params,
        "adapter_bytes_fp32": adapter_file_bytes,
        "adapter_bytes_fp16": adapter_params * 2,
    }
    injection.release_device_copies()
    del personalised, model, injection
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m dreamcache_core.evaluation.benchmark",
        description="Time DreamCache against the unpatched model through ComfyUI's sampling code (random weights).")
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or the custom_nodes parent)")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES),
                        help="shape(s) to run (repeatable); default: mid")
    parser.add_argument("--full", action="store_true",
                        help="also the real SD1.5 (512x512) and SDXL (1024x1024) U-Nets (random weights; for a GPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when there is one")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--steps", type=int, default=6, help="Euler steps per sampling run (default 6)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="A/B pairs of runs (default 5); order alternates A,B,B,A,...")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subject-fraction", type=float, default=1.0,
                        help="fraction of reference tokens kept in the memory (1 = unmasked reference, the worst "
                             "case; ~0.4 is typical of a masked DreamBench subject)")
    parser.add_argument("--apply-to", default="positive", choices=["positive", "both"],
                        help="positive: joint guidance (default); both: positive and negative chunks")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the markdown table here")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0.0 < args.subject_fraction <= 1.0:
        parser.error("--subject-fraction must lie in (0, 1]")
    return args


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu.")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def prepare_device(args) -> torch.device:
    """The device ``args.device`` names, with ComfyUI made importable for it and torch's CPU threads set."""
    device = resolve_device(args.device)

    ensure_comfyui(args.comfyui, cpu=device.type == "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv=None) -> list:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = prepare_device(args)
    dtype = resolve_dtype(args.dtype, device)
    shapes = list(args.shape or ["mid"])
    if args.full:
        shapes += [s for s in FULL_SHAPES if s not in shapes]
    settings = BenchmarkSettings(steps=args.steps, repeats=args.repeats, warmup=args.warmup, cfg=args.cfg,
                                 seed=args.seed, subject_fraction=args.subject_fraction, apply_to=args.apply_to)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = [benchmark_shape(SHAPES[name], device, dtype, settings, log) for name in shapes]
    environment = environment_info(device)
    report_results(markdown_table(results, environment, command_line(argv)), results, environment,
                   command_line(argv), args.markdown, args.json)
    return results


if __name__ == "__main__":
    main()
