"""Schedules of the injection's strength over the sampling steps and over the frames of a batch (plain torch).

Step schedules shape the strength between start_percent and end_percent. With u the step's progress inside
that window (0 at start_percent, 1 at end_percent; a step's progress is ComfyUI's sampling percent, read back
from its sigma), the strength is multiplied by:

    linear          1                      the strength as set, on every step (IP-Adapter's "linear")
    ease in         1 - u                  full at the start, fading to 0: the subject sets shape and layout,
                                           the prompt finishes the details
    ease out        u                      0 at the start, growing to full: the prompt sets the layout, the
                                           subject's appearance comes in late
    ease in-out     1 - |2u - 1|           0 at both ends, full in the middle of the window
    reverse in-out  |2u - 1|               full at both ends, 0 in the middle

Frame weights give each image of a latent batch (each frame of an animation) its own multiplier: a list
"1, 0.8, 0.5" (one per frame; the last holds for the frames after it) or keyframes "0=1, 16=0.2, 31=1"
(frame=weight, linear in between, held before the first and after the last).
"""
from __future__ import annotations

import bisect
import math
import re
import struct
from typing import Callable, Optional, Sequence

import torch

from .input_checks import LAYER_WEIGHT_LIMIT

STEP_SCHEDULES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out")
CONSTANT_SCHEDULE = "linear"
PERCENT_GRID = 1000  # sampling percents tabulated to read a sigma back as a percent


def float32(value: float) -> float:
    """``value`` rounded to float32, so that host arithmetic gives what float32 tensor arithmetic gave."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def schedule_factor(schedule: str, u):
    """The multiplier of ``schedule`` at progress ``u`` in 0..1 (a float or a tensor)."""
    if schedule == "linear":
        return u * 0 + 1.0
    if schedule == "ease in":
        return 1.0 - u
    if schedule == "ease out":
        return u * 1.0
    if schedule == "ease in-out":
        return 1.0 - abs(2.0 * u - 1.0)
    if schedule == "reverse in-out":
        return abs(2.0 * u - 1.0)
    raise ValueError(f"weight_schedule must be one of {list(STEP_SCHEDULES)}, got {schedule!r}.")


class StepSchedule:
    """A step schedule between two sampling percents, evaluated on a batch of sigmas.

    percent_to_sigma: the model's ``model_sampling.percent_to_sigma`` (decreasing in the percent); it is
    tabulated once, and a step's sigma is read back as a percent by interpolating log sigma.
    """

    def __init__(self, schedule: str, start_percent: float, end_percent: float,
                 percent_to_sigma: Callable[[float], float]):
        schedule_factor(schedule, 0.0)  # the name is checked here
        self.schedule = schedule
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        inner = torch.linspace(0.0, 1.0, PERCENT_GRID + 1, dtype=torch.float64)[1:-1]
        percents = torch.cat([torch.tensor([1e-6], dtype=torch.float64), inner,
                              torch.tensor([1.0 - 1e-6], dtype=torch.float64)])  # ~ the first and the last sigma
        sigmas = torch.tensor([float(percent_to_sigma(float(p))) for p in percents], dtype=torch.float64)
        keep = sigmas > 0
        # increasing in log sigma for the interpolation: reversed; host lists, so that a step's factor is
        # found without touching a device (the patches call this inside the U-Net)
        self._log_sigmas = sigmas[keep].log().flip(0).tolist()
        self._percents = percents[keep].flip(0).tolist()

    def percent_at(self, sigma: float) -> float:
        """The sampling percent of one sigma (0 = the first step's noise level, 1 = clean)."""
        x, y = self._log_sigmas, self._percents
        log_sigma = math.log(max(float(sigma), 1e-12))
        index = min(max(bisect.bisect_left(x, log_sigma), 1), len(x) - 1)
        x0, x1, y0, y1 = x[index - 1], x[index], y[index - 1], y[index]
        t = min(max((log_sigma - x0) / (x1 - x0), 0.0), 1.0)
        return y0 + t * (y1 - y0)

    def progress_at(self, sigma: float) -> float:
        span = self.end_percent - self.start_percent
        if span <= 0:
            return 0.0
        return min(max((self.percent_at(sigma) - self.start_percent) / span, 0.0), 1.0)

    def factors_of(self, sigmas: Sequence[float]) -> list[float]:
        """The multiplier at each sigma, as host floats rounded to float32."""
        return [float32(schedule_factor(self.schedule, self.progress_at(s))) for s in sigmas]

    def percent_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """``percent_at`` of each sigma of a tensor, as a float64 CPU tensor."""
        return torch.tensor([self.percent_at(s) for s in sigma.detach().reshape(-1).tolist()],
                            dtype=torch.float64).reshape(sigma.shape)

    def factors(self, sigma: torch.Tensor) -> torch.Tensor:
        """Float32 multiplier per sigma of a tensor."""
        return torch.tensor(self.factors_of(sigma.detach().reshape(-1).tolist()),
                            dtype=torch.float32).reshape(sigma.shape)


FRAME_ENTRY = re.compile(r"^\s*(\d+)\s*[=:]\s*(\S+)\s*$")
MAX_FRAME = 1_000_000  # keyframe numbers above this are typos (no latent batch comes near), and are refused


def _shortened(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters with the count of the rest, so a pasted wall of digits stays readable."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def frame_weight_problem(weight: float, entry: str) -> Optional[str]:
    if not math.isfinite(weight) or weight < 0 or weight > LAYER_WEIGHT_LIMIT:
        return (f"Frame weight '{_shortened(entry)}' must be a number from 0 to {LAYER_WEIGHT_LIMIT:g} (0 leaves that frame "
                "unpersonalised).")
    return None


class FrameWeights:
    """Per-frame multipliers parsed from what the artist typed (see the module text)."""

    def __init__(self, values: Optional[Sequence[float]] = None, keyframes: Optional[Sequence[tuple]] = None):
        self.values = None if values is None else [float(v) for v in values]
        self.keyframes = None if keyframes is None else sorted((int(f), float(w)) for f, w in keyframes)

    def for_frames(self, frames: int) -> list[float]:
        """One multiplier per frame of a batch of ``frames``."""
        if self.values is not None:
            return [self.values[min(i, len(self.values) - 1)] for i in range(frames)]
        out = []
        for frame in range(frames):
            before = [k for k in self.keyframes if k[0] <= frame]
            after = [k for k in self.keyframes if k[0] >= frame]
            if not before:
                out.append(after[0][1])
            elif not after:
                out.append(before[-1][1])
            else:
                (f0, w0), (f1, w1) = before[-1], after[0]
                out.append(w0 if f1 == f0 else w0 + (w1 - w0) * (frame - f0) / (f1 - f0))
        return out


def parse_frame_weights(text: str) -> Optional[FrameWeights]:
    """``"1, 0.5, 0"`` or ``"0=1, 8=0"`` -> FrameWeights; an empty string gives None (every frame 1)."""
    text = (text or "").strip()
    if not text:
        return None
    entries = [e.strip() for e in text.replace(";", ",").replace("\n", ",").split(",") if e.strip()]
    if not entries:
        raise ValueError(f"Frame weights {_shortened(text)!r} hold no weight, only separators. Write one weight per frame "
                         "('1, 0.8, 0.5'), keyframes ('0=1, 16=0'), or leave the field empty for 1 on every frame.")
    keyed = ["=" in e or ":" in e for e in entries]
    if any(keyed) and not all(keyed):
        raise ValueError(f"Frame weights {_shortened(text)!r} mix plain weights and frame=weight keyframes: write either one "
                         "weight per frame ('1, 0.8, 0.5') or keyframes ('0=1, 16=0').")
    if all(keyed):
        keyframes, seen = [], set()
        for entry in entries:
            found = FRAME_ENTRY.match(entry)
            weight = None
            if found:
                try:
                    weight = float(found.group(2))
                except ValueError:
                    weight = None
            if weight is None:
                raise ValueError(f"Frame weight keyframe '{_shortened(entry)}' is not frame=weight with a frame number from 0 "
                                 "and a weight, e.g. '0=1, 16=0.2'.")
            digits = found.group(1).lstrip("0") or "0"
            if len(digits) > len(str(MAX_FRAME)) or int(digits) > MAX_FRAME:
                raise ValueError(f"Frame weight keyframe '{_shortened(entry)}' names frame {_shortened(digits)}, "
                                 f"beyond the last frame any batch has; frame numbers go from 0 to {MAX_FRAME}.")
            frame = int(digits)
            if frame in seen:
                raise ValueError(f"Frame {frame} has two keyframes in {_shortened(text)!r}; give each frame once.")
            seen.add(frame)
            problem = frame_weight_problem(weight, entry)
            if problem:
                raise ValueError(problem)
            keyframes.append((frame, weight))
        return FrameWeights(keyframes=keyframes)
    values = []
    for entry in entries:
        try:
            weight = float(entry)
        except ValueError as error:
            raise ValueError(f"Frame weight '{_shortened(entry)}' is not a number: write one weight per frame separated by "
                             "commas, e.g. '1, 0.8, 0.5', or keyframes such as '0=1, 16=0'.") from error
        problem = frame_weight_problem(weight, entry)
        if problem:
            raise ValueError(problem)
        values.append(weight)
    return FrameWeights(values=values)
