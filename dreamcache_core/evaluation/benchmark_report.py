"""The benchmarks' reports: the markdown table of the per-step benchmark, the machine it ran on, the command
line that reproduces it, and the files (markdown, JSON) it is written to."""
from __future__ import annotations

import json
import os
import platform
from typing import Optional

import torch

from ..comfy_bridge.sampling import comfyui_environment


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:.1f} KiB"


def _signed_mib(n: float) -> str:
    return ("+" if n >= 0 else "-") + _mib(abs(n))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def markdown_table(results: list, environment: dict, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {environment['device_name']}, torch {environment['torch']}, {environment['threads']} threads, "
        f"{environment['attention']}"
        + (f", load average {environment['load_average'][0]:.2f} at the end." if environment.get("load_average")
           else "."),
        "",
        "| shape | unpatched step | personalised step | per-step overhead (median [min, max] of paired runs) "
        "| per-step FLOPs overhead | Encode | plain pass | Encode / plain pass (FLOPs) "
        "| peak memory unpatched / personalised (extra) | cache per reference | memory K/V | adapter (fp32 file / fp16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["step_ratio"]
        enc = r["encode_ratio"]
        lines.append(
            f"| {r['shape']} ({r['image_size']}px, {r['dtype']}) "
            f"| {_ms(r['step_seconds']['unpatched']['median'])} "
            f"| {_ms(r['step_seconds']['personalised']['median'])} "
            f"| {100 * (ratio['median'] - 1):+.1f} % [{100 * (ratio['min'] - 1):+.1f}, {100 * (ratio['max'] - 1):+.1f}] "
            f"| {100 * (r['step_flops_ratio'] - 1):+.2f} % "
            f"| {_ms(r['encode_seconds']['median'])} | {_ms(r['plain_pass_seconds']['median'])} "
            f"| {enc['median']:.2f}x [{enc['min']:.2f}, {enc['max']:.2f}] ({r['encode_flops'] / r['plain_pass_flops']:.3f}x) "
            f"| {_mib(r['peak_memory_bytes']['unpatched']['median'])} / "
            f"{_mib(r['peak_memory_bytes']['personalised']['median'])} ({_signed_mib(r['peak_memory_extra_bytes'])}) "
            f"| {_mib(r['cache_bytes_per_reference'])} | {_mib(r['memory_kv_bytes'])} "
            f"| {_mib(r['adapter_bytes_fp32'])} / {_mib(r['adapter_bytes_fp16'])} |"
        )
    s = results[0]["settings"] if results else {}
    lines += [
        "",
        f"Per step: median time of one model call (classifier-free guidance, batch of 2: positive + negative) over "
        f"{s.get('repeats')} runs of {s.get('steps')} Euler steps per model, runs alternating A/B; the overhead is the "
        f"median over adjacent run pairs of personalised / unpatched. The reference is injected into the "
        f"{'positive chunk only (joint guidance)' if s.get('apply_to') == 'positive' else 'positive and negative chunks'}, "
        f"memory = {'all' if s.get('subject_fraction', 1) >= 1 else 'about {:.0%} of the'.format(s.get('subject_fraction'))} "
        "reference tokens. Encode = the Encode DreamCache pass (one U-Net call at t = 1 with feature capture) against "
        "the same one-call path on the unpatched model; both single-latent. FLOPs: torch's FlopCounterMode over one "
        "step (matmuls, convolutions, attention; machine-independent, so free of the timing noise). Peak memory: "
        f"{results[0]['peak_memory_kind'] if results else ''} during a sampling run.",
    ]
    return "\n".join(lines)


def environment_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    info["attention"] = comfyui_environment()["attention"]
    return info


def command_line(argv, module: str = "dreamcache_core.evaluation.benchmark") -> str:
    return f"python -m {module}" + ("" if not argv else " " + " ".join(argv))


def report_results(table: str, results: list, environment: dict, command: str, markdown_path: Optional[str],
                   json_path: Optional[str]) -> None:
    """Print the table; write it to ``markdown_path`` and the results to ``json_path`` when given."""
    print(table)
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"command": command, "environment": environment, "results": results}, handle, indent=2)
