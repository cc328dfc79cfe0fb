"""Artist controls of the injection, in plain torch: ``Controls`` (everything an artist sets for one injection,
as one value), layer presets, per-layer weights and region masks.

A layer preset picks the memory layers that are personalised by what they do (``LAYER_PRESETS``: shape =
the middle layer, appearance = the decoder layers, ...); the group weights and per-layer weights below
multiply or override it. Schedules over steps and frames are in ``schedules``.

Per-layer weights (a schedule over the memory layers) multiply the global
strength: ``middle`` scales the middle transformer, ``decoder`` every decoder
memory layer, and single layers can be set by their key
(``output_blocks.4.1``) or ComfyUI block name (``output.4``, ``middle``).

A region mask is a MASK over the generated image (1 = personalise). Each memory
layer sees it resized to its own token grid by area averaging, so a token's
weight is the fraction of it the mask covers: tokens the mask does not touch
keep the unpatched output bit for bit, fully covered ones get the full
strength, tokens on a soft or partial edge a proportional share.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .input_checks import check_finite_tensor, layer_weight_problem
from .layers import MemoryLayerSpec
from .schedules import CONSTANT_SCHEDULE, FrameWeights

REFERENCE_MODES = ("shared", "per_image")


def _layer_names(spec: MemoryLayerSpec) -> set[str]:
    names = {spec.key.lower(), f"{spec.block[0]}.{spec.block[1]}", f"{spec.block[0]}_{spec.block[1]}"}
    if spec.block[0] == "middle":
        names.add("middle")
    return names


LAYER_NAME_FORMS = re.compile(r"^(middle|decoder|middle_block\.\d+|(input|output)_blocks\.\d+\.\d+|"
                              r"(input|output|middle)[._]\d+)$")


def layer_weight_entries(text: str) -> list[tuple[str, str, float]]:
    """``"output.4=0.5, middle=1"`` -> [(entry, lower-case name, weight)], checked without a model: the syntax,
    each weight finite and within ``input_checks.LAYER_WEIGHT_LIMIT``, each name of a form a layer can have."""
    out = []
    for entry in (text or "").replace(";", ",").replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        if "=" not in entry and ":" not in entry:
            raise ValueError(f"Layer weight '{entry}' has no '=': write key=weight, e.g. 'output_blocks.4.1=0.5'.")
        name, _, value = entry.replace(":", "=").partition("=")
        name = name.strip().lower()
        try:
            weight = float(value)
        except ValueError as error:
            raise ValueError(f"Layer weight '{entry}': '{value.strip()}' is not a number.") from error
        problem = layer_weight_problem(weight, entry)
        if problem:
            raise ValueError(problem)
        if not LAYER_NAME_FORMS.match(name):
            raise ValueError(f"Layer weight '{entry}': '{name}' is not a memory layer name. Use a layer key "
                             "(output_blocks.4.1), a block name (output.4, middle) or a group (middle, decoder).")
        out.append((entry, name, weight))
    return out


def parse_layer_weights(text: str, specs: Iterable[MemoryLayerSpec]) -> dict[str, float]:
    """``"output_blocks.4.1=0.5, output.10=0"`` -> {layer key: weight}; an empty string gives {}.

    Keys are layer keys, ComfyUI block names (``output.4``, ``middle``) or the groups ``middle`` and
    ``decoder``; separate entries with commas, semicolons or new lines.
    """
    specs = list(specs)
    out: dict[str, float] = {}
    valid = ", ".join(["middle", "decoder"] + [s.key for s in specs])
    try:
        entries = layer_weight_entries(text)
    except ValueError as error:
        raise ValueError(f"{error} Keys: {valid}.") from None
    for entry, name, weight in entries:
        if name == "decoder":
            matched = [s.key for s in specs if s.block[0] == "output"]
        else:
            matched = [s.key for s in specs if name in _layer_names(s)]
        if not matched:
            raise ValueError(f"Layer weight '{entry}': '{name}' is not a memory layer of this model. Keys: {valid}.")
        for key in matched:
            out[key] = weight
    return out


LAYER_PRESETS = ("all layers", "shape (middle)", "appearance (decoder)", "composition (middle + coarse decoder)",
                 "detail (fine decoder)")
DEFAULT_LAYER_PRESET = "all layers"


def layer_groups(specs: Iterable[MemoryLayerSpec]) -> dict[str, str]:
    """Layer key -> "middle", "coarse" or "fine": the decoder memory layers in forward order, the first half
    (lower resolution: composition and shape) coarse, the rest (higher resolution: texture and detail) fine."""
    specs = list(specs)
    decoder = sorted((s for s in specs if s.block[0] == "output"), key=lambda s: s.block[1])
    coarse = {s.key for s in decoder[:math.ceil(len(decoder) / 2)]}
    return {s.key: "middle" if s.block[0] == "middle" else ("coarse" if s.key in coarse else "fine") for s in specs}


def layer_preset_weights(preset: str, specs: Iterable[MemoryLayerSpec]) -> dict[str, float]:
    """Layer key -> 1 or 0: the memory layers ``preset`` personalises.

    all layers: every memory layer. shape (middle): the middle layer only (shape and identity).
    appearance (decoder): every decoder layer (colour, texture, detail). composition (middle + coarse decoder):
    the middle and the lower-resolution half of the decoder layers. detail (fine decoder): the
    higher-resolution half of the decoder layers only.
    """
    on = {"all layers": {"middle", "coarse", "fine"}, "shape (middle)": {"middle"},
          "appearance (decoder)": {"coarse", "fine"}, "composition (middle + coarse decoder)": {"middle", "coarse"},
          "detail (fine decoder)": {"fine"}}.get(preset)
    if on is None:
        raise ValueError(f"layer_preset must be one of {list(LAYER_PRESETS)}, got {preset!r}.")
    return {key: 1.0 if group in on else 0.0 for key, group in layer_groups(specs).items()}


def layer_strengths(specs: Iterable[MemoryLayerSpec], middle_weight: float = 1.0, decoder_weight: float = 1.0,
                    overrides: str = "", preset: str = DEFAULT_LAYER_PRESET) -> dict[str, float]:
    """Per-layer multipliers of the global strength: the preset's layers (1, others 0) times the middle /
    decoder group weights, then per-key overrides (which replace the product)."""
    specs = list(specs)
    chosen = layer_preset_weights(preset, specs)
    out = {s.key: chosen[s.key] * float(middle_weight if s.block[0] == "middle" else decoder_weight) for s in specs}
    overridden = parse_layer_weights(overrides, specs)
    out.update(overridden)
    if not any(chosen.values()) and not any(overridden.values()):
        raise ValueError(no_layer_selected_message(preset, specs))
    return out


def no_layer_selected_message(preset: str, specs: list[MemoryLayerSpec]) -> str:
    """Why ``preset`` personalises nothing on a model with memory layers ``specs``, and what to pick instead."""
    groups = layer_groups(specs)
    counts = {group: sum(1 for g in groups.values() if g == group) for group in ("middle", "coarse", "fine")}
    has = (f"{'a middle memory layer' if counts['middle'] else 'no middle transformer'} and "
           f"{counts['coarse'] + counts['fine']} decoder memory layer(s) "
           f"({counts['coarse']} coarse, {counts['fine']} fine)")
    working = [name for name in LAYER_PRESETS if any(layer_preset_weights(name, specs).values())]
    return (f"layer_preset {preset!r} selects no memory layer of this model, which has {has}: DreamCache would "
            f"change nothing. Pick a preset that has layers here ({', '.join(repr(n) for n in working)}), or name "
            "layers in layer_weights (e.g. 'decoder=1').")


def prepare_region_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A MASK ([H, W] or [M, H, W], 1 = personalise) as float [M, H, W] in 0..1 on the CPU; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"The attention mask must be a MASK tensor, got {type(mask).__name__}.")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"The attention mask has shape {tuple(mask.shape)}; a MASK is [H, W] or [batch, H, W].")
    check_finite_tensor(mask, "The attention mask (attn_mask)", "Give a mask with values in 0..1.")
    mask = mask.detach().to("cpu", torch.float32).clamp(0, 1)
    for i in range(mask.shape[0]):
        if float(mask[i].max()) <= 0:
            raise ValueError(
                f"The attention mask{'' if mask.shape[0] == 1 else f' {i}'} is empty (all zeros), so DreamCache "
                "would change nothing there. Paint the region the subject should appear in, or disconnect attn_mask.")
    return mask.contiguous()


def region_token_weights(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[M, H, W] mask -> [M, height*width] token weights: the fraction of each token the mask covers."""
    if tuple(mask.shape[1:]) == (height, width):
        resized = mask
    else:
        resized = F.adaptive_avg_pool2d(mask[:, None], (height, width))[:, 0]
    return resized.flatten(1).clamp(0, 1)


def token_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of the token grid of the current transformer call."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and int(shape[2]) * int(shape[3]) == tokens:
        return int(shape[2]), int(shape[3])
    original = extra_options.get("original_shape")
    if original is not None and len(original) >= 4:
        height, width = int(original[-2]), int(original[-1])
        for factor in (1, 2, 4, 8, 16, 32, 64):
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == tokens:
                return h, w
    side = int(round(math.sqrt(tokens)))
    if side * side == tokens:
        return side, side
    raise ValueError(f"Cannot tell the token grid of a {tokens}-token layer, so the attention mask cannot be "
                     "resized to it.")


@dataclass(frozen=True, eq=False)
class Controls:
    """What an artist sets for one injection (Apply DreamCache's and the Guider's inputs, in the core's terms).
    ``injection.build_injection`` checks them against the model, the adapter and the cache.

    strength: how much of the adapter's change is kept, active between start_percent and end_percent of
    sampling. region_mask: where it applies (``prepare_region_mask``), None = everywhere. reference_mode:
    "shared" or "per_image" (``REFERENCE_MODES``); reference_weights: "1, 0.5" as typed, a list, or None for the
    cache's own weights. layer_preset, middle_weight, decoder_weight, layer_weights: which memory layers and how
    strongly (``layer_strengths``). weight_schedule: the strength's shape over the steps
    (``schedules.STEP_SCHEDULES``); frame_weights: a factor per image of the batch ("1, 0.5", keyframes
    "0=1, 16=0", a ``FrameWeights``, or None)."""

    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    region_mask: Optional[torch.Tensor] = None
    reference_mode: str = "shared"
    reference_weights: Union[str, Sequence[float], None] = None
    middle_weight: float = 1.0
    decoder_weight: float = 1.0
    layer_weights: str = ""
    layer_preset: str = DEFAULT_LAYER_PRESET
    weight_schedule: str = CONSTANT_SCHEDULE
    frame_weights: Union[str, FrameWeights, None] = None
