"""Where DreamCache adapters come from, in the words every "adapter not found" message uses.

One adapter has been released: the authors' SD2.1-base adapter, a ``torch.save`` file named
``cross_attention-<step>.pt``, linked as "pretrained adapter" (a Google Drive folder) from the README of the
authors' repository. Adapters for SD1.5, SDXL and their fine-tunes do not exist until someone trains them with
this pack's training script (``python -m dreamcache_core.training.train``), which can install its final adapter
into ComfyUI's ``models/dreamcache`` folder (``--install-as``).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

AUTHORS_REPOSITORY = "https://github.com/Emanuele97x/DreamCache"
AUTHORS_ADAPTER_PATTERN = "cross_attention-<step>.pt"
ADAPTER_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def where_adapters_come_from(target_folder: str) -> str:
    """Two sentences: the released adapter and where to get it, and how SD1.5/SDXL adapters are made; the file
    goes into ``target_folder``."""
    return (f"The only released adapter is the authors' SD2.1-base one ({AUTHORS_ADAPTER_PATTERN}, the "
            f"'pretrained adapter' link in the README of {AUTHORS_REPOSITORY}): put it in {target_folder} and use "
            "it with an SD2.1-base checkpoint (v2-1_512-ema-pruned). Adapters for SD1.5, SDXL and their fine-tunes "
            "are trained with this pack's training script (python -m dreamcache_core.training.train ... "
            "--install-as NAME.safetensors puts the result in that folder).")


def adapter_files_in(folders: Iterable[str]) -> list:
    """The adapter files (by suffix) directly inside ``folders``, sorted, without duplicates."""
    names = set()
    for folder in folders:
        if os.path.isdir(folder):
            names.update(name for name in os.listdir(folder)
                         if name.lower().endswith(ADAPTER_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))
    return sorted(names)


def missing_adapter_message(name: str, folders: Sequence[str], available: Sequence[str]) -> str:
    """The message for an adapter ``name`` that is not in any of ``folders`` (searched in that order; the file
    goes in the first), listing the adapters that are there (``available``)."""
    searched = ", ".join(folders) if folders else "no folder (none is registered)"
    if available:
        shown = ", ".join(list(available)[:10]) + (f" and {len(available) - 10} more" if len(available) > 10 else "")
        found = f"Adapters there: {shown}."
    else:
        found = "There are no adapter files there."
    target = folders[0] if folders else "ComfyUI/models/dreamcache"
    return (f"DreamCache adapter '{name}' not found; looked in: {searched}. {found} "
            f"{where_adapters_come_from(target)} After adding a file, refresh ComfyUI (R) and pick it in Load "
            "DreamCache Adapter.")
