"""Training throughput: samples/s of the DreamCache training step against plain U-Net training, same U-Net.

    python -m dreamcache_core.evaluation.training_benchmark --shape tiny --shape mid                    # the CPU, shrunk shapes
    python -m dreamcache_core.evaluation.training_benchmark --shape sd15-512 --shape sdxl-1024 \\
        --batch 4 --precision bf16 --precision fp32 --checkpointing both --markdown training.md   # a GPU

Per configuration (shape x autocast precision x gradient checkpointing), on
ComfyUI's own SD1.5 / SDXL architectures with seeded random weights (fp32
weights, as the trainer keeps them; no checkpoint, nothing downloads):

* **plain**: one forward + backward of the whole U-Net with every U-Net weight
  trainable (what fine-tuning the U-Net itself costs), through the same loss
  code (``training_loss.denoising_losses`` without an adapter);
* **adapter**: the DreamCache training step as ``training_loop`` runs it: the
  Encode pass of each row's reference at t = 1 (no gradients;
  ``comfy_bridge.encode_reference``), then the denoising loss with the adapter
  injected and the backward pass into the adapter only (U-Net frozen);
* **adapter, cached**: the same without the Encode pass (references'
  caches precomputed with ``train --precompute-caches``).

Runs alternate plain / adapter so that machine drift cancels; each time is the
median of ``--repeats`` timed steps after ``--warmup`` untimed ones (a step =
one micro-batch of ``--batch`` rows, the optimizer excluded: it is the same
small AdamW update over 25M parameters for every configuration). samples/s =
batch / median step time. Each step's floating-point operations, forward and
backward, are counted once with torch's FlopCounterMode (machine-independent:
what GPU-hour estimates scale from).

Peak memory per step: on a GPU ``torch.cuda.max_memory_allocated`` (tensors
only), on the CPU the process's peak resident set size from the kernel (VmHWM,
reset before the step: the benchmark's ``PeakMemory``), which holds the
weights, the step's activations and gradients, and the Python/torch/ComfyUI
runtime; the RSS before the step is recorded beside it. One process reuses
memory freed by an earlier step without the RSS showing it, so measure one
step kind per process (``--step``) for clean numbers. ``--memory-only`` runs
each step once under the probe (no repeats, no FLOP count: for shapes that
take minutes a step); ``--weights bf16`` keeps the U-Net in bf16 as ComfyUI
loads it on a GPU; ``--optimizer adamw|adafactor`` adds the trainer's
optimizer step (its state) to the DreamCache steps.
Gradient checkpointing recomputes the middle and decoder blocks
(``training_loss.gradient_checkpointing``), for the plain step as well.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..io.memory_probes import PeakMemory
from .benchmark import conditioning, counted_flops, median, prepare_device, synchronize
from .benchmark_report import command_line, environment_info, report_results
from .benchmark_shapes import SHAPES
from ..comfy_bridge.models import meta_unet, random_model
from ..comfy_bridge import encode_reference
from ..method.adapter import build_adapter
from ..method.layers import discover_memory_layers, model_signature
from ..training.training_loop import TrainConfig, make_optimizer
from ..training.training_loss import LossRow, sigma_of_timestep, denoising_losses, gradient_checkpointing

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = ("plain", "adapter", "adapter_cached")


@dataclass(frozen=True)
class StepSettings:
    batch: int = 2
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    timestep: int = 500
    steps: tuple = STEPS          # which step kinds run
    memory_only: bool = False     # one probed run per step kind, no repeats, no FLOP count
    optimizer: str = "none"       # none | adamw | adafactor: the DreamCache steps include the optimizer step


def training_rows(model_patcher, shape, settings: StepSettings, device: torch.device):
    """(loss rows without caches, reference latents): random targets, noise, text; one reference per row."""
    generator = torch.Generator().manual_seed(settings.seed)
    side = shape.latent
    cond = conditioning(shape, settings.seed)
    context, options = cond[0][0][0], cond[0][1]
    pooled = options.get("pooled_output")
    sigma = float(sigma_of_timestep(model_patcher, [settings.timestep])[0])
    rows, references = [], []
    for _ in range(settings.batch):
        latent = torch.randn(4, side, side, generator=generator)
        rows.append(LossRow(latent, torch.randn(4, side, side, generator=generator), sigma, context,
                            None if pooled is None else pooled[0]))
        references.append(torch.randn(1, 4, side, side, generator=generator))
    return rows, references, cond


def empty_conditioning(cond):
    context, options = cond[0][0], cond[0][1]
    return [[torch.zeros_like(context), {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                                         for k, v in options.items()}]]


def timed(device: torch.device, run) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory(device: torch.device, run) -> tuple:
    """(peak bytes, bytes before, seconds) of one ``run()``: CUDA max_memory_allocated, or the process's peak
    RSS on the CPU (``io.memory_probes.PeakMemory``)."""
    gc.collect()
    with PeakMemory(device) as probe:
        seconds = timed(device, run)
    return probe.peak_bytes, probe.start_bytes, seconds


def benchmark_configuration(model_patcher, adapter, shape, settings: StepSettings, device: torch.device,
                            precision: str, checkpointing: bool) -> dict:
    """Median step times (s) and samples/s of plain, adapter and adapter-cached steps for one configuration."""
    unet = model_patcher.model.diffusion_model
    dtype = PRECISIONS[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    rows, references, cond = training_rows(model_patcher, shape, settings, device)
    empty = empty_conditioning(cond)

    def encode_all():
        with torch.no_grad(), autocast():
            return [encode_reference(model_patcher, reference, empty, seed) for seed, reference in enumerate(references)]

    caches = encode_all()
    cached_rows = [LossRow(r.latent, r.noise, r.sigma, r.cond, r.pooled, c) for r, c in zip(rows, caches)]

    def plain_step():
        unet.requires_grad_(True)
        try:
            denoising_losses(model_patcher, None, rows, autocast=autocast).sum().backward()
        finally:
            unet.requires_grad_(False)
            unet.zero_grad(set_to_none=True)

    optimizer = None
    if settings.optimizer != "none":
        optimizer = make_optimizer(adapter.parameters(), TrainConfig(output_dir="", optimizer=settings.optimizer))

    def adapter_step(with_encode: bool):
        step_rows = cached_rows
        if with_encode:
            step_rows = [LossRow(r.latent, r.noise, r.sigma, r.cond, r.pooled, c)
                         for r, c in zip(rows, encode_all())]
        denoising_losses(model_patcher, adapter, step_rows, autocast=autocast).sum().backward()
        if optimizer is not None:
            optimizer.step()
        adapter.zero_grad(set_to_none=True)

    runs = {"plain": plain_step, "adapter": lambda: adapter_step(True), "adapter_cached": lambda: adapter_step(False)}
    runs = {name: run for name, run in runs.items() if name in settings.steps}
    times = {name: [] for name in runs}
    memory, memory_before = {}, {}
    flops = {}
    with gradient_checkpointing(unet, checkpointing):
        for name, run in runs.items():
            for _ in range(0 if settings.memory_only else settings.warmup):
                run()
            memory[name], memory_before[name], seconds = peak_memory(device, run)
            if settings.memory_only:
                times[name].append(seconds)
        for repeat in range(0 if settings.memory_only else settings.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(list(runs)))
            for name in order:
                times[name].append(timed(device, runs[name]))
        if not settings.memory_only:
            flops = {name: counted_flops(run, gradients=True) for name, run in runs.items()}
    seconds = {name: median(values) for name, values in times.items()}
    return {"flops_per_sample": {name: count / settings.batch for name, count in flops.items()},
            "shape": shape.name, "image_size": shape.latent * 8, "precision": precision,
            "gradient_checkpointing": checkpointing, "batch": settings.batch, "seconds": seconds,
            "all_seconds": times, "samples_per_second": {n: settings.batch / s for n, s in seconds.items()},
            "peak_memory_bytes": memory, "memory_before_step_bytes": memory_before,
            "peak_memory_kind": PeakMemory(device).kind, "optimizer": settings.optimizer}


def benchmark_shape(name: str, device: torch.device, settings: StepSettings, precisions: list,
                    checkpointing: list, log, weights: str = "fp32") -> list:
    shape = SHAPES[name]
    log(f"{name}: building the U-Net ({shape.description})")
    model_patcher = random_model(shape.family, shape.unet, settings.seed, WEIGHT_DTYPES[weights], device)
    unet = model_patcher.model.diffusion_model
    unet.requires_grad_(False)
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet), seed=settings.seed).to(device)
    adapter.requires_grad_(True)
    results = []
    for precision in precisions:
        for enabled in checkpointing:
            log(f"{name}: {precision}, gradient checkpointing {'on' if enabled else 'off'}")
            result = benchmark_configuration(model_patcher, adapter, shape, settings, device, precision, enabled)
            result["adapter_parameters"] = adapter.parameter_count()
            result["unet_parameters"] = sum(p.numel() for p in unet.parameters())
            result["weights"] = weights
            results.append(result)
    del model_patcher, unet, adapter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def forward_flops(name: str, device: torch.device, seed: int = 0) -> int:
    """FLOPs of one plain forward pass of one sample of ``name`` (no gradients: fits machines that cannot
    train the shape), the unit the training-step FLOPs of smaller shapes are scaled by."""
    shape = SHAPES[name]
    model_patcher = random_model(shape.family, shape.unet, seed, torch.float32, device)
    model_patcher.model.diffusion_model.requires_grad_(False)
    rows, _, _ = training_rows(model_patcher, shape, StepSettings(batch=1, seed=seed), device)
    return counted_flops(lambda: denoising_losses(model_patcher, None, rows))


def meta_forward_flops(name: str, batch: int = 1) -> int:
    """FLOPs of one plain forward pass of ``name``'s U-Net per sample, counted on the meta device: shapes only,
    no memory and seconds even for SDXL at 1024 (equal to ``forward_flops`` through ComfyUI's sampling path;
    tested on the tiny shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = SHAPES[name]
    meta = torch.device("meta")
    unet = meta_unet(shape.family, shape.unet)
    x = torch.zeros(batch, 4, shape.latent, shape.latent, device=meta)
    context = torch.zeros(batch, shape.tokens, shape.unet["context_dim"], device=meta)
    y = torch.zeros(batch, shape.unet["adm_in_channels"], device=meta) if shape.unet.get("adm_in_channels") else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, torch.full((batch,), 500.0, device=meta), context=context, y=y)
    return int(counter.get_total_flops()) // batch


def _memory(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / 2 ** 30:.2f} GiB"


def _rate(r: dict, name: str) -> str:
    if name not in r["seconds"]:
        return "n/a"
    return f"{r['samples_per_second'][name]:.2f} samples/s ({r['seconds'][name] * 1000:.0f} ms)"


def _ratio(values: dict, name: str) -> str:
    if name not in values or "plain" not in values:
        return "n/a"
    return f"{values[name] / values['plain']:.2f}x"


def _tflop(values: dict, name: str) -> str:
    return f"{values[name] / 1e12:.4g}" if name in values else "n/a"


def markdown_table(results: list, environment: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Machine: {environment['device_name']}, torch {environment['torch']}, {environment['threads']} threads.",
             "",
             "| shape | precision | grad. checkpointing | batch | plain U-Net fwd+bwd | DreamCache step (Encode + fwd+bwd) "
             "| DreamCache step, cached | step / plain (time) | step / plain (FLOPs) | TFLOP per sample plain / DreamCache "
             "| peak memory plain / DreamCache / cached |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, m, f = r["seconds"], r["peak_memory_bytes"], r["flops_per_sample"]
        lines.append(
            f"| {r['shape']} ({r['image_size']}px) | {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['batch']} | {_rate(r, 'plain')} | {_rate(r, 'adapter')} | {_rate(r, 'adapter_cached')} "
            f"| {_ratio(s, 'adapter')} / {_ratio(s, 'adapter_cached')} "
            f"| {_ratio(f, 'adapter')} / {_ratio(f, 'adapter_cached')} "
            f"| {_tflop(f, 'plain')} / {_tflop(f, 'adapter')} "
            f"| {_memory(m.get('plain'))} / {_memory(m.get('adapter'))} / {_memory(m.get('adapter_cached'))} |")
    kinds = sorted({r.get("peak_memory_kind", "") for r in results})
    weights = sorted({r.get("weights", "fp32") for r in results})
    optimizers = sorted({r.get("optimizer", "none") for r in results})
    lines += ["", "Step = one micro-batch (forward + backward"
                  + (", optimizer excluded" if optimizers == ["none"] else
                     f"; the DreamCache steps include the {'/'.join(optimizers)} optimizer step") +
                  "), median of the timed repeats; samples/s = batch / step time; step / plain = DreamCache step "
                  "(with Encode / with cached references) over the plain step. FLOPs: torch's FlopCounterMode over "
                  "one step, forward and backward (machine-independent). Random weights; "
                  f"{'/'.join(weights)} U-Net weights with the listed autocast. Peak memory: {', '.join(kinds)}."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.evaluation.training_benchmark",
                                description="Training throughput of DreamCache against plain U-Net training.")
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or the custom_nodes parent)")
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default: tiny")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", action="append", choices=sorted(PRECISIONS),
                   help="autocast precision(s), repeatable (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "both"], help="gradient checkpointing")
    p.add_argument("--weights", default="fp32", choices=sorted(WEIGHT_DTYPES),
                   help="U-Net weight dtype (fp32: as the trainer keeps --unet-dtype fp32; ComfyUI's auto choice on "
                        "a GPU is fp16/bf16)")
    p.add_argument("--step", action="append", choices=STEPS,
                   help="step kinds to run, repeatable (default: all three); one per process gives clean CPU peaks")
    p.add_argument("--memory-only", action="store_true",
                   help="run each step once under the peak-memory probe (no warm-up, repeats or FLOP count)")
    p.add_argument("--optimizer", default="none", choices=["none", "adamw", "adafactor"],
                   help="add the trainer's optimizer step to the DreamCache steps (its state counts in the peak)")
    p.add_argument("--batch", type=int, default=2, help="rows per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--forward-flops", action="store_true",
                   help="only count the FLOPs of one plain forward pass per shape, on the meta device (seconds, no "
                        "memory: for shapes too large to run here)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> list:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = prepare_device(args)
    command = command_line(argv, "dreamcache_core.evaluation.training_benchmark")
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32"])
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    settings = StepSettings(args.batch, args.repeats, args.warmup, args.seed,
                            steps=tuple(s for s in STEPS if s in (args.step or STEPS)), memory_only=args.memory_only,
                            optimizer=args.optimizer)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.forward_flops:
        counts = {name: meta_forward_flops(name) for name in args.shape or ["tiny"]}
        for name, count in counts.items():
            print(f"{name}: {count / 1e12:.4f} TFLOP per sample, one plain forward pass")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"command": command, "forward_flops_per_sample": counts}, handle, indent=2)
        return [counts]
    results = []
    for name in args.shape or ["tiny"]:
        results += benchmark_shape(name, device, settings, precisions, checkpointing, log, args.weights)
    environment = environment_info(device)
    report_results(markdown_table(results, environment, command), results, environment, command, args.markdown,
                   args.json)
    return results


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
