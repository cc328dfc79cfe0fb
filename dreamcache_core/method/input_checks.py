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

import json
import math
from typing import Optional, Type

import torch

# |weight| allowed for a per-layer weight (layer_weights). The useful range is 0..2; weights far beyond it only
# blow the layer's output up (1e30 gives inf, then NaN downstream), so anything beyond this is taken as a typo.
LAYER_WEIGHT_LIMIT = 100.0

# The documented ranges of the numbers an artist sets, whether typed into a widget or arriving through a link
# (the nodes declare these as their widgets' min/max, and the core checks them again): name -> (min, max).
# Strength 1e30 or a guidance scale of 1e30 is finite but overflows the sampled latent to inf/NaN; inside these
# ranges nothing of ours can (strength x layer weight x frame weight <= 2 x 100 x 100 scales the adapter's change
# of one self-attention output, far from float32's or float16's overflow for a normalised activation).
STRENGTH_RANGE = (0.0, 2.0)          # Apply DreamCache's strength (0 = the input model, 1 = as trained)
PERCENT_RANGE = (0.0, 1.0)           # start_percent / end_percent
GROUP_WEIGHT_RANGE = (0.0, 2.0)      # middle_weight / decoder_weight
GUIDANCE_SCALE_RANGE = (0.0, 100.0)  # the DreamCache Guider's text_cfg / image_cfg
COMBINE_WEIGHT_RANGE = (0.0, 10.0)   # Combine DreamCache's weight_1..4


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


# Nesting deeper than this in a file's JSON metadata is refused: what the pack writes is at most 3 levels deep,
# and Python's parser would otherwise hit its recursion limit (RecursionError) on a forged file.
JSON_DEPTH_LIMIT = 32


def json_depth_problem(text: str) -> Optional[str]:
    """None when the JSON ``text`` nests arrays/objects at most ``JSON_DEPTH_LIMIT`` deep, else the message
    (counted on the characters, outside strings, before any parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for character in text:
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > JSON_DEPTH_LIMIT:
                return f"nests lists or objects more than {JSON_DEPTH_LIMIT} levels deep"
        elif character in "]}":
            depth -= 1
    return None


def read_json_field(text, name: str, advice: str = "", error: Type[Exception] = ValueError):
    """The value of the JSON ``text`` of field ``name`` (a file's metadata), or ``error`` saying what is wrong
    with it: not text, not valid JSON, or nested too deeply to read safely."""
    if not isinstance(text, str):
        raise error(f"{name} is a {type(text).__name__}, not JSON text.{_tail(advice)}")
    problem = json_depth_problem(text)
    if problem:
        raise error(f"{name} {problem}, which no DreamCache file does.{_tail(advice)}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as decode_error:
        raise error(f"{name} is not valid JSON ({decode_error.msg}).{_tail(advice)}") from decode_error
    except RecursionError as recursion_error:  # not reached below the depth limit; kept as a last guard
        raise error(f"{name} nests too deeply to read.{_tail(advice)}") from recursion_error


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
