"""Finiteness and magnitude checks of user inputs and file tensors, in one place (plain torch).

ComfyUI's own range check does not catch NaN (``NaN < min`` and ``NaN > max``
are both false), and a NaN or an infinity anywhere in the chain (a strength, a
per-layer weight, a guidance scale, a reference pixel, a tensor read from an
adapter or cache file) turns the whole picture into NaN without a word. Every
number a node takes and every tensor it reads from a file or an input goes
through these functions, which name the input or tensor and say what to do.

``*_problem`` functions return None or the message (what queue-time
validation returns to ComfyUI); ``check_*`` functions raise it.
"""
from __future__ import annotations

import math
from typing import Optional, Type

import torch

# |weight| allowed for a per-layer weight (layer_weights). The useful range is 0..2; weights far beyond it only
# blow the layer's output up (1e30 gives inf, then NaN downstream), so anything beyond this is taken as a typo.
LAYER_WEIGHT_LIMIT = 100.0


def number_problem(value, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
                   advice: str = "") -> Optional[str]:
    """None when ``value`` is a finite number inside [minimum, maximum], else what is wrong with input ``name``."""
    bounds = _describe_bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is {value!r}, not a number. Set it to a number{bounds}.{_tail(advice)}"
    if not math.isfinite(value):
        return f"{name} is {value}, not a finite number. Set it to a finite number{bounds}.{_tail(advice)}"
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        return f"{name} is {value}, outside its range. Set it to a number{bounds}.{_tail(advice)}"
    return None


def check_number(value, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 advice: str = "") -> float:
    """``value`` as a float, or ValueError naming input ``name`` when it is not finite or out of range."""
    problem = number_problem(value, name, minimum, maximum, advice)
    if problem:
        raise ValueError(problem)
    return float(value)


def tensor_problem(tensor: torch.Tensor, name: str, advice: str = "") -> Optional[str]:
    """None when every value of ``tensor`` is finite (integer and bool tensors always are), else the message."""
    if not isinstance(tensor, torch.Tensor):
        return f"{name} is a {type(tensor).__name__}, not a tensor.{_tail(advice)}"
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return None
    finite = torch.isfinite(tensor.detach())
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor.detach()).sum())
    infinite = int((~finite).sum()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{infinite} infinite" if infinite else ""]
    return (f"{name} holds {' and '.join(p for p in parts if p)} value(s) out of {tensor.numel()}, so every result "
            f"computed from it would be NaN.{_tail(advice)}")


def check_finite_tensor(tensor: torch.Tensor, name: str, advice: str = "",
                        error: Type[Exception] = ValueError) -> torch.Tensor:
    """``tensor`` itself, or ``error`` naming tensor ``name`` when it holds NaN or infinite values."""
    problem = tensor_problem(tensor, name, advice)
    if problem:
        raise error(problem)
    return tensor


def layer_weight_problem(weight: float, entry: str) -> Optional[str]:
    """None for a finite per-layer weight with |weight| <= LAYER_WEIGHT_LIMIT, else the message."""
    if not math.isfinite(weight):
        return f"Layer weight '{entry}' is not finite. Give a number, typically between 0 and 2."
    if abs(weight) > LAYER_WEIGHT_LIMIT:
        return (f"Layer weight '{entry}' is beyond +-{LAYER_WEIGHT_LIMIT:g}, which only blows the layer up (the "
                "useful range is 0..2). Give a smaller number.")
    return None


def _describe_bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" between {minimum:g} and {maximum:g}"
    if minimum is not None:
        return f" of at least {minimum:g}"
    if maximum is not None:
        return f" of at most {maximum:g}"
    return ""


def _tail(advice: str) -> str:
    return f" {advice}" if advice else ""
