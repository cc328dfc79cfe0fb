"""Finding ComfyUI and making it importable for the command-line runners (before ``comfy`` loads)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional


def find_comfyui(explicit: Optional[str] = None) -> Path:
    """The ComfyUI checkout to use: ``explicit``, else $COMFYUI_PATH, else the folder holding custom_nodes/<pack>."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    pack_root = Path(__file__).resolve().parent.parent
    if pack_root.parent.name == "custom_nodes":
        candidates.append(pack_root.parent.parent)
    for path in candidates:
        if (path / "comfy" / "model_management.py").is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates) or "nothing (no --comfyui, no COMFYUI_PATH, pack not in custom_nodes)"
    raise RuntimeError(f"ComfyUI was not found (tried {tried}). Pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH.")


def ensure_comfyui(explicit: Optional[str] = None, cpu: bool = False, pytorch_attention: bool = True) -> Path:
    """Make ComfyUI importable from a command-line runner; set its options before ``comfy`` loads."""
    path = find_comfyui(explicit)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = args.cpu or cpu
        if pytorch_attention:
            args.use_pytorch_cross_attention = True
    return path
