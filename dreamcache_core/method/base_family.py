"""Which base model family an adapter or a model belongs to, in words a user knows (plain torch, no ComfyUI).

The text encoder's width (``context_dim`` of the signature, the width of cross-attention keys) names the
family: 768 is SD1.5 (CLIP-L), 1024 is SD2.x (OpenCLIP-H), 2048 is SDXL (CLIP-L + OpenCLIP-bigG). The memory
layers tell the layouts apart: SD1.x/SD2.x have theirs at ``middle_block.1`` and ``output_blocks.4/6/8/10.1``
(five layers), SDXL, which has no attention at the highest resolution, at ``middle_block.1`` and
``output_blocks.1/3/5.1`` (four layers). A text width whose layout does not fit (or any other width) is
"an unknown base (text width N)".
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from .layers import MemoryLayerSpec

SD_LAYOUT = ("middle_block.1", "output_blocks.4.1", "output_blocks.6.1", "output_blocks.8.1", "output_blocks.10.1")
SDXL_LAYOUT = ("middle_block.1", "output_blocks.1.1", "output_blocks.3.1", "output_blocks.5.1")
LAYOUT_NAMES = {SD_LAYOUT: "SD1.5/SD2.x", SDXL_LAYOUT: "SDXL"}
SD_WIDTHS = (1280, 1280, 640, 640, 320)
SDXL_WIDTHS = (1280, 1280, 640, 640)

# text width -> (family, the memory layer layout of that family)
TEXT_WIDTH_FAMILIES = {768: ("SD1.5", SD_LAYOUT), 1024: ("SD2.x", SD_LAYOUT), 2048: ("SDXL", SDXL_LAYOUT)}
UNKNOWN = "an unknown base"


def _specs_of(signature: Optional[dict], specs) -> Optional[list]:
    """The memory layers: ``specs`` (MemoryLayerSpec or their JSON dicts), else the signature's ``layers``."""
    if specs is None and signature:
        specs = signature.get("layers")
    if specs is None:
        return None
    if isinstance(specs, dict):
        specs = specs.values()
    return [s if isinstance(s, MemoryLayerSpec) else MemoryLayerSpec.from_json(s) for s in specs]


MAX_TEXT_WIDTH = 65536  # far beyond any text encoder (SDXL's is 2048): a wider value is a damaged file


def context_width_problem(value) -> Optional[str]:
    """None when ``value`` is a usable text width (a whole number 1..MAX_TEXT_WIDTH, or None = not recorded), else
    what is wrong with it (a file may hold text, a list, a fraction or infinity there)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"its text width (context_dim) is {str(value)[:40]!r}, not a number"
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_TEXT_WIDTH:
        return f"its text width (context_dim) is {value}, not a whole number from 1 to {MAX_TEXT_WIDTH}"
    return None


def _context_dim(signature: Optional[dict], context_dim: Optional[int]) -> Optional[int]:
    if context_dim is None and signature:
        context_dim = signature.get("context_dim")
    problem = context_width_problem(context_dim)
    if problem:
        raise ValueError(f"The adapter or model signature is damaged: {problem}. Save or convert the adapter again.")
    return int(context_dim) if context_dim is not None else None


def layout_name(specs: Iterable[MemoryLayerSpec]) -> Optional[str]:
    """"SD1.5/SD2.x" or "SDXL" when the memory layers sit where that family has them, else None."""
    keys = tuple(sorted(s.key for s in specs))
    for layout, name in LAYOUT_NAMES.items():
        if keys == tuple(sorted(layout)):
            return name
    return None


def _family(context_dim: Optional[int], specs: Optional[list]) -> Optional[str]:
    """The family's short name, or None when unknown."""
    layout = tuple(sorted(s.key for s in specs)) if specs is not None else None
    if context_dim is not None:
        known = TEXT_WIDTH_FAMILIES.get(context_dim)
        if known is None:
            return None
        name, family_layout = known
        return name if layout is None or layout == tuple(sorted(family_layout)) else None
    if specs is None:
        return None
    # no text width recorded (an authors' checkpoint read without its base): the layers alone, at full size
    widths = tuple(s.dim for s in sorted(specs, key=lambda s: _position(s.key)))
    if layout == tuple(sorted(SD_LAYOUT)) and widths == SD_WIDTHS:
        return "SD1.5 or SD2.x"
    if layout == tuple(sorted(SDXL_LAYOUT)) and widths == SDXL_WIDTHS:
        return "SDXL"
    return None


def _position(key: str):
    parts = key.split(".")
    section = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(parts[0], 3)
    number = int(parts[1]) if section != 1 and len(parts) > 1 and parts[1].isdigit() else 0
    return section, number, key


def base_family(signature: Optional[dict] = None, specs=None, context_dim: Optional[int] = None) -> str:
    """The model family of a signature (``layers.model_signature`` or an adapter's) and/or memory layers:
    "SD1.5", "SD2.x", "SDXL", "SD1.5 or SD2.x" (layers only, no text width), or
    "an unknown base (text width N)"."""
    context_dim = _context_dim(signature, context_dim)
    name = _family(context_dim, _specs_of(signature, specs))
    if name is not None:
        return name
    return f"{UNKNOWN} (text width {context_dim})" if context_dim is not None else UNKNOWN


def is_known_family(name: str) -> bool:
    return not name.startswith(UNKNOWN)


def describe_base(signature: Optional[dict] = None, specs=None, context_dim: Optional[int] = None) -> str:
    """The family with what identifies it, for messages: "SDXL (text width 2048, 4 memory layers)";
    an unknown base says where its layers sit: "an unknown base (text width 64, 5 memory layers placed as in
    SD1.5/SD2.x)"."""
    context_dim = _context_dim(signature, context_dim)
    specs = _specs_of(signature, specs)
    name = _family(context_dim, specs)
    details = [f"text width {context_dim}" if context_dim is not None else "text width not recorded"]
    if specs is not None:
        count = f"{len(specs)} memory layer{'s' if len(specs) != 1 else ''}"
        layout = layout_name(specs)
        if name is None and layout is not None:
            count += f" placed as in {layout}"
        details.append(count)
    return f"{name or UNKNOWN} ({', '.join(details)})"


def block_name(spec: MemoryLayerSpec) -> str:
    """ComfyUI's name of a memory layer's block: "middle.0", "output.4" (what attention patches are keyed by)."""
    return f"{spec.block[0]}.{spec.block[1]}"


def block_names(specs: Iterable[MemoryLayerSpec]) -> str:
    return ", ".join(block_name(s) for s in sorted(specs, key=lambda s: _position(s.key)))


def _checkpoint_of(family: str) -> str:
    return f"an {family} checkpoint" if is_known_family(family) else "the base model the adapter was trained with"


def mismatch_advice(adapter_family: str, model_family: str) -> str:
    """What to do when an adapter of ``adapter_family`` meets a model of ``model_family``."""
    if adapter_family == model_family:
        same = (f"Both are {model_family}, but their layers differ (another size or head layout): "
                if is_known_family(model_family) else "")
        return f"{same}{'l' if same else 'L'}oad an adapter trained for this very model, or use the base model the " \
               "adapter was trained with."
    wanted = model_family if is_known_family(model_family) else "this model's base"
    return f"Load an adapter trained for {wanted}, or use {_checkpoint_of(adapter_family)}."


def describe_adapter(adapter) -> str:
    """A few lines on what a DreamCacheAdapter is for: base family, text width, memory layers (ComfyUI block
    names), layer widths, parameter count, and whether its norms are still to be folded (an authors' checkpoint)."""
    specs = [adapter.specs[k] for k in adapter.keys()]
    specs.sort(key=lambda s: _position(s.key))
    signature = adapter.signature or {}
    context_dim = _context_dim(signature, None)
    family = base_family(signature, specs)
    layout = layout_name(specs)
    widths = {}  # width -> head layouts, in the order of the layers
    for spec in specs:
        layouts = widths.setdefault(spec.dim, [])
        if (spec.heads, spec.dim_head) not in layouts:
            layouts.append((spec.heads, spec.dim_head))
    width_text = ", ".join(f"{width} ({' / '.join(f'{h} heads of {d}' for h, d in layouts)})"
                           for width, layouts in widths.items())
    lines = [f"DreamCache adapter for {family}"]
    if context_dim is not None:
        lines.append(f"text width: {context_dim}")
    else:
        lines.append("text width: not recorded (the base is guessed from the layers)")
    placed = f", placed as in {layout}" if layout is not None and not is_known_family(family) else ""
    lines.append(f"memory layers: {len(specs)} ({block_names(specs)}){placed}")
    lines.append(f"layer widths: {width_text}")
    lines.append(f"parameters: {adapter.parameter_count() / 1e6:.2f}M")
    if adapter.norm_folded:
        lines.append("norms: folded, ready for Apply DreamCache")
    else:
        lines.append("norms: an authors' checkpoint; its LN_m is folded against the model's norm1 when "
                     "Apply DreamCache runs")
    return "\n".join(lines)
