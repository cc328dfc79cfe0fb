"""Model arguments of the command-line runners, resolved the way ComfyUI resolves a loader's file name.

``resolve_model_file(value, kind)``: a path to an existing file is used as it is; otherwise, when a ComfyUI
checkout is found (``--comfyui``, ``COMFYUI_PATH`` or the custom_nodes folder the pack sits in), ``value`` is
looked up as a model name in ComfyUI's folder for that kind (``folder_paths.get_full_path``: checkpoints,
dreamcache with the pack's models/ folder, sams). A miss raises ``ModelFileNotFound`` naming every place looked in.

``install_adapter``: copies a trained adapter into ComfyUI's models/dreamcache folder (``train --install-as``).
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from ..io.model_paths import MODEL_KINDS, ModelFileNotFound, existing_file, not_found_message
from .checkout import ensure_comfyui, find_comfyui
from . import model_folders  # model_folders.register_model_folders looked up at call time: tests substitute it


def comfyui_folder_paths(comfyui: Optional[str] = None):
    """ComfyUI's ``folder_paths`` with the pack's folders registered, or (None, why not) without a ComfyUI."""
    try:
        find_comfyui(comfyui)
    except RuntimeError as error:
        return None, str(error)
    ensure_comfyui(comfyui)
    import folder_paths

    model_folders.register_model_folders()
    return folder_paths, ""


def resolve_model_file(value: Optional[str], kind: str, comfyui: Optional[str] = None) -> Optional[str]:
    """The file ``value`` names (``kind``: "checkpoint", "adapter" or "sam"): a path, or a ComfyUI model name.
    None stays None (the argument was not given)."""
    if not value or os.path.isfile(value):
        return value
    found = existing_file(value)
    if found:
        return found
    looked_in = [os.path.abspath(os.path.expanduser(value))]
    folder_paths, why_not = comfyui_folder_paths(comfyui)
    if folder_paths is not None:
        folder = MODEL_KINDS[kind].folder
        full = folder_paths.get_full_path(folder, value)
        if full:
            return full
        looked_in += folder_paths.get_folder_paths(folder)
    raise ModelFileNotFound(not_found_message(kind, value, looked_in, why_not))


def adapter_install_target(name: str, overwrite: bool = False, comfyui: Optional[str] = None) -> str:
    """Where ``install_adapter`` will put ``name``: ComfyUI's first models/dreamcache folder. Checked before
    training starts: a bare .safetensors file name, a ComfyUI found, no file there unless ``overwrite``."""
    if os.path.basename(name) != name or not name.lower().endswith(".safetensors") or name.startswith("."):
        raise ValueError(f"--install-as {name!r}: give a file name ending in .safetensors, without folders "
                         "(e.g. --install-as dreamcache_sd15.safetensors); it is written into ComfyUI's "
                         "models/dreamcache folder.")
    folder_paths, why_not = comfyui_folder_paths(comfyui)
    if folder_paths is None:
        raise ValueError(f"--install-as needs a ComfyUI to install into: {why_not}")
    target = os.path.join(folder_paths.get_folder_paths(MODEL_KINDS["adapter"].folder)[0], name)
    if os.path.exists(target) and not overwrite:
        raise ValueError(f"{target} already exists; pick another --install-as name, or add --overwrite-installed "
                         "to replace it.")
    return target


def install_adapter(source: str, name: str, overwrite: bool = False, comfyui: Optional[str] = None) -> str:
    """Copy the adapter file ``source`` to ComfyUI's models/dreamcache/``name``; returns the installed path."""
    target = adapter_install_target(name, overwrite, comfyui)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".partial"
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target
