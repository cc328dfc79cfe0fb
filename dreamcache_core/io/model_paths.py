"""Model files named on the command line: a path, or a ComfyUI model name, and what a missing one says.

Plain path handling (no ComfyUI): ``existing_file`` accepts a path to a file as it is; ``not_found_message`` says
"<what> '<name>' not found; looked in: <paths>" and what to do, per kind of file. Names are looked up in ComfyUI's
model folders by ``dreamcache_core.comfy_bridge.model_files.resolve_model_file``, the one function every runner
calls for its model arguments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .adapter_sources import where_adapters_come_from


@dataclass(frozen=True)
class ModelKind:
    what: str            # in messages: "Checkpoint", "DreamCache adapter", "SAM checkpoint"
    folder: str          # ComfyUI's folder_paths name
    example: str         # a typical file name, for the message
    get_it: str          # where such files come from (may name {target})


CHECKPOINT = ModelKind("Checkpoint", "checkpoints", "v1-5-pruned-emaonly.safetensors",
                       "An SD1.5, SD2.x or SDXL checkpoint (.safetensors or .ckpt) as Load Checkpoint reads it; put it "
                       "in {target}.")
ADAPTER = ModelKind("DreamCache adapter", "dreamcache", "cross_attention-199999.pt", "")
SAM = ModelKind("SAM checkpoint", "sams", "sam_vit_b_01ec64.pth",
                "Segment Anything checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth) are "
                "linked from https://github.com/facebookresearch/segment-anything; put one in {target}.")
MODEL_KINDS = {"checkpoint": CHECKPOINT, "adapter": ADAPTER, "sam": SAM}


class ModelFileNotFound(FileNotFoundError):
    """A model argument that is neither a file nor a name in ComfyUI's model folders."""

    def __str__(self):  # the message alone, without errno decoration
        return self.args[0] if self.args else ""


def existing_file(value: str) -> Optional[str]:
    """The absolute path of ``value`` when it names an existing file (``~`` expanded), else None."""
    path = os.path.abspath(os.path.expanduser(value))
    return path if os.path.isfile(path) else None


def not_found_message(kind: str, name: str, looked_in: Sequence[str], comfyui_note: str = "") -> str:
    """``<what> '<name>' not found; looked in: <paths>.`` plus what to do for this kind of file.

    ``looked_in``: every path tried, the path as given first, then ComfyUI's folders (the file goes in the
    first of those); ``comfyui_note``: why no ComfyUI folder was searched, if none was."""
    model = MODEL_KINDS[kind]
    folders = list(looked_in[1:])
    target = folders[0] if folders else f"ComfyUI/models/{model.folder}"
    hint = where_adapters_come_from(target) if kind == "adapter" else model.get_it.format(target=target)
    message = f"{model.what} '{name}' not found; looked in: {', '.join(looked_in)}."
    if comfyui_note:
        message += f" {comfyui_note}"
    return (f"{message} Pass a path to the file, or a file name in ComfyUI's models/{model.folder} folder "
            f"(e.g. {model.example}) with ComfyUI found through --comfyui, COMFYUI_PATH or the custom_nodes folder "
            f"the pack sits in. {hint}")
