"""Peak memory, measured: the process's resident set size as the kernel reports it (/proc/self/status), and
``PeakMemory``, the peak while a block runs (CUDA's allocator on a GPU, the process's peak RSS on the CPU).
The benchmarks and the training loop's step log read memory through here.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import torch


def proc_status_bytes(field_name: str) -> Optional[int]:
    """A byte count from /proc/self/status (``field_name``: VmRSS, VmHWM, ...); None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets the peak resident set size (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory while a block runs, in absolute bytes.

    GPU: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: the process's peak resident set size,
    from the kernel (VmHWM, reset before the block) on Linux, else sampled every ``interval_s`` with psutil.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        if reset_peak_rss():
            self.start_bytes = proc_status_bytes("VmRSS") or 0
            return self
        import psutil

        process = psutil.Process()
        self.start_bytes = self._peak = process.memory_info().rss
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                time.sleep(self.interval_s)

        self._process = process
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is None:
            self.peak_bytes = int(proc_status_bytes("VmHWM") or 0)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = int(max(self._peak, self._process.memory_info().rss))
        return False
