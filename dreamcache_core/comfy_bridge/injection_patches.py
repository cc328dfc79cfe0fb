"""Registering an injection on a ComfyUI ModelPatcher, and taking it off again.

An injection is two attention patches (``attn1_patch`` keeps norm1(x), ``attn1_output_patch`` replaces the
self-attention output) and one apply_model wrapper, ``record_row_sigmas``, which reads the step's sigmas to the
host once per model call so that the patches decide which rows to personalise without reading the device
inside the U-Net. The wrapper is registered once per ModelPatcher under one key, however many injections it
carries; ComfyUI's clone() copies it with the patches.
"""
from __future__ import annotations

from ..method.patch import DreamCacheInjection, DreamCacheNorm1Patch, DreamCacheOutputPatch, record_row_sigmas

ROW_SIGMAS_WRAPPER = "dreamcache_row_sigmas"
PATCH_KINDS = ("attn1_patch", "attn1_output_patch")


def _apply_model_wrapper_type() -> str:
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP.APPLY_MODEL


def attach_injection(model_patcher, injection: DreamCacheInjection):
    """Register the injection's two callables (and the row-sigma wrapper, once) on ``model_patcher``, a clone."""
    model_patcher.set_model_attn1_patch(injection.attn1_patch)
    model_patcher.set_model_attn1_output_patch(injection.attn1_output_patch)
    wrapper_type = _apply_model_wrapper_type()
    if not model_patcher.get_wrappers(wrapper_type, ROW_SIGMAS_WRAPPER):
        model_patcher.add_wrapper_with_key(wrapper_type, ROW_SIGMAS_WRAPPER, record_row_sigmas)
    return model_patcher


def carries_injection(model_patcher) -> bool:
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    ours = (DreamCacheNorm1Patch, DreamCacheOutputPatch)
    return any(isinstance(p, ours) for name in PATCH_KINDS for p in patches.get(name, []))


def without_dreamcache_patches(model_patcher):
    """``model_patcher`` itself when it carries no DreamCache injection, else a clone without this pack's own
    attn1 patches and wrapper (other packs' patches, LoRAs and wrappers stay): Encode must cache the base model's
    features, also when it is fed the MODEL that Apply DreamCache returned."""
    if not carries_injection(model_patcher):
        return model_patcher
    ours = (DreamCacheNorm1Patch, DreamCacheOutputPatch)
    clone = model_patcher.clone()
    clone_patches = clone.model_options["transformer_options"]["patches"]
    for name in PATCH_KINDS:
        if name in clone_patches:
            kept = [p for p in clone_patches[name] if not isinstance(p, ours)]
            if kept:
                clone_patches[name] = kept
            else:
                del clone_patches[name]
    clone.remove_wrappers_with_key(_apply_model_wrapper_type(), ROW_SIGMAS_WRAPPER)
    return clone
