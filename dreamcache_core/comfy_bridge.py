"""The one place where dreamcache_core reaches ComfyUI.

Every ComfyUI import happens inside a function, so the rest of the core stays
importable (and testable) without ComfyUI. Inside ComfyUI the modules are
already importable; command-line runners call ``ensure_comfyui()`` first, which
finds the checkout from an explicit path, ``COMFYUI_PATH``, or the
``custom_nodes`` folder this pack sits in.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch

from .cache import DreamCache
from .encode import cache_from_features, capture_memory_inputs
from .input_checks import check_finite_tensor, check_number

ENCODE_TIMESTEP = 1  # DESIGN.md: the reference is noised to t = 1, the least noisy step


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


@dataclass
class ModelPass:
    """What one model call saw and returned, in the model's own latent space (after ``process_latent_in``)."""

    denoised: torch.Tensor        # the model's x0 prediction [B, C, h, w]
    latent: torch.Tensor          # the clean latent the rows were noised from
    sigma: torch.Tensor           # [B] float32, each row's sigma
    model_sampling: object        # the model's ModelSampling (noise_scaling, calculate_input, ...)


_SINGLE_PASS_SAMPLER = None


def _single_pass_sampler_class():
    """A ComfyUI ``Sampler`` that noises each row to its own sigma and calls the model once (built on first use)."""
    global _SINGLE_PASS_SAMPLER
    if _SINGLE_PASS_SAMPLER is None:
        import comfy.samplers

        class SinglePassSampler(comfy.samplers.Sampler):
            def __init__(self, row_sigmas: torch.Tensor):
                self.row_sigmas = row_sigmas
                self.result = None

            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                model_sampling = model_wrap.inner_model.model_sampling
                sigma = self.row_sigmas.to(device=latent_image.device, dtype=torch.float32)
                x = model_sampling.noise_scaling(sigma, noise, latent_image)
                self.result = ModelPass(model_wrap(x, sigma, **extra_args), latent_image, sigma, model_sampling)
                return latent_image

        _SINGLE_PASS_SAMPLER = SinglePassSampler
    return _SINGLE_PASS_SAMPLER


def single_model_pass(model_patcher, latent: torch.Tensor, noise: torch.Tensor, conditioning,
                      row_sigmas: torch.Tensor, seed: int = 0) -> ModelPass:
    """One model call through ComfyUI's own guider (its latent format, patches, wrappers and memory
    management, as KSampler runs the model), the positive conditioning only, row i of the raw ``latent``
    noised with ``noise`` to ``row_sigmas[i]``. Encode DreamCache, the training loss and the benchmark's
    plain pass all run the model through here. Differentiable when gradients are on."""
    import comfy.samplers

    row_sigmas = torch.as_tensor(row_sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
    if row_sigmas.numel() == 1:
        row_sigmas = row_sigmas.expand(latent.shape[0])
    sampler = _single_pass_sampler_class()(row_sigmas)
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    schedule = torch.stack([row_sigmas.max(), torch.tensor(0.0)])
    guider.sample(noise, latent, sampler, schedule, disable_pbar=True, seed=seed)
    return sampler.result


def encode_sigma(model_patcher) -> float:
    """sigma of the encode timestep t = 1 for this model."""
    model_sampling = model_patcher.get_model_object("model_sampling")
    return float(model_sampling.sigma(torch.tensor([float(ENCODE_TIMESTEP)]))[0])


def encode_reference(model_patcher, reference_latent: torch.Tensor, conditioning, seed: int,
                     mask: Optional[torch.Tensor] = None) -> DreamCache:
    """One U-Net pass at t = 1 on the reference latent(s) through ComfyUI's own sampling machinery.

    The model is placed by ComfyUI's memory manager and keeps every patch it carries (LoRAs, wrappers);
    ``conditioning`` is a ComfyUI CONDITIONING (typically the empty or negative prompt). Returns the
    cache of the memory layers' inputs; ``mask`` [N or 1, H, W] drops background tokens.
    """
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model_patcher, reference_latent)
    expected_channels = model_patcher.get_model_object("latent_format").latent_channels
    if latent.dim() != 4 or latent.shape[1] != expected_channels:
        raise ValueError(
            f"The reference latent has shape {tuple(latent.shape)}, but this model works on {expected_channels}-channel "
            "latents. Encode the reference image with this model's VAE (VAE Encode) before Encode DreamCache."
        )
    if torch.count_nonzero(latent) == 0:
        raise ValueError("The reference latent is all zeros (an empty latent). Encode a reference image with VAE Encode.")
    check_finite_tensor(latent, "The reference LATENT", "Check the image and the VAE Encode before Encode DreamCache "
                        "(a NaN pixel or a VAE run in too low a precision gives NaN latents).")
    if mask is not None:
        check_finite_tensor(mask, "The Encode DreamCache mask", "Give a mask with values in 0..1.")
    check_latent_size(model_patcher.model.diffusion_model, latent)
    model_patcher = without_dreamcache_patches(model_patcher)

    sigma = encode_sigma(model_patcher)
    noise = comfy.sample.prepare_noise(latent, seed)
    unet = model_patcher.model.diffusion_model
    features = capture_memory_inputs(
        unet, lambda: single_model_pass(model_patcher, latent, noise, conditioning, torch.tensor([sigma]), seed))
    metadata = {
        "latent_size": [int(latent.shape[2]), int(latent.shape[3])],
        "seed": int(seed),
        "timestep": ENCODE_TIMESTEP,
        "sigma": sigma,
        "num_references": int(latent.shape[0]),
    }
    return cache_from_features(unet, {k: v.cpu() for k, v in features.items()}, mask, metadata)


def without_dreamcache_patches(model_patcher):
    """``model_patcher`` itself when it carries no DreamCache injection, else a clone without this pack's own
    attn1 patches (other packs' patches, LoRAs and wrappers stay): Encode must cache the base model's features,
    also when it is fed the MODEL that Apply DreamCache returned."""
    from .patch import DreamCacheNorm1Patch, DreamCacheOutputPatch

    ours = (DreamCacheNorm1Patch, DreamCacheOutputPatch)
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    if not any(isinstance(p, ours) for name in ("attn1_patch", "attn1_output_patch") for p in patches.get(name, [])):
        return model_patcher
    clone = model_patcher.clone()
    clone_patches = clone.model_options["transformer_options"]["patches"]
    for name in ("attn1_patch", "attn1_output_patch"):
        if name in clone_patches:
            kept = [p for p in clone_patches[name] if not isinstance(p, ours)]
            if kept:
                clone_patches[name] = kept
            else:
                del clone_patches[name]
    return clone


def check_latent_size(unet, latent: torch.Tensor) -> None:
    """ValueError when the latent is too small for the U-Net's downsampling: every downsampling but the last must
    halve a side of at least 2 latent pixels (smaller maps collapse to 1x1 and the pass fails in a GroupNorm)."""
    downsamplings = sum(1 for module in unet.input_blocks.modules() if type(module).__name__ == "Downsample")
    minimum = 2 ** max(downsamplings - 1, 0)
    height, width = int(latent.shape[2]), int(latent.shape[3])
    if min(height, width) < minimum:
        raise ValueError(
            f"The reference latent is {width}x{height}, too small for this U-Net's {downsamplings} downsamplings: it "
            f"needs at least {minimum}x{minimum} latent pixels ({minimum * 8}x{minimum * 8} image pixels). Give a "
            "larger reference image (ideally the model's resolution, e.g. 512 for SD1.5).")


def comfy_memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Memory attention through ComfyUI's optimized attention (the one the U-Net itself uses).

    Same contract as ``adapter.multihead_attention``: k, v may have batch 1 and are broadcast.
    """
    import comfy.ldm.modules.attention as comfy_attention

    batch = q.shape[0]
    if k.shape[0] != batch:
        k = k.expand(batch, -1, -1)
        v = v.expand(batch, -1, -1)
    if key_mask is None:
        return comfy_attention.optimized_attention(q, k, v, heads)
    mask = key_mask.to(torch.bool) if not key_mask.is_floating_point() else key_mask.to(q.dtype)  # float = additive bias
    mask = mask.expand(batch, -1)[:, None, None, :]
    return comfy_attention.optimized_attention_masked(q, k, v, heads, mask=mask)


_GUIDER_CLASS = None


def combined_guider_class():
    """ComfyUI's ``CFGGuider`` subclass running DreamCache's combined guidance (built on first use).

    The guider's MODEL carries an injection restricted to ``guidance.REFERENCE_CHUNKS``; per step it runs
    ONE ``calc_cond_batch`` over [positive, negative, negative] = [e(I,T), e(I,0), e(0,0)] (ComfyUI batches
    the three chunks into one U-Net call when memory allows; the reference reaches chunks 0 and 1 only) and
    combines them with ``guidance.combined_guidance``. Predictions the scales make redundant are skipped
    unless the model options set ``disable_cfg1_optimization``. Post-CFG hooks on the model still run.
    """
    global _GUIDER_CLASS
    if _GUIDER_CLASS is not None:
        return _GUIDER_CLASS
    import comfy.samplers

    from .guidance import IMAGE_ONLY, IMAGE_TEXT, UNCONDITIONAL, combined_guidance, needed_predictions

    class DreamCacheCombinedGuider(comfy.samplers.CFGGuider):
        text_cfg = 7.5
        image_cfg = 5.0

        def set_cfg(self, text_cfg, image_cfg=None):
            self.text_cfg = float(text_cfg)
            self.image_cfg = float(text_cfg if image_cfg is None else image_cfg)
            self.cfg = self.text_cfg

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            positive = self.conds.get("positive", None)
            negative = self.conds.get("negative", None)
            optimise = not model_options.get("disable_cfg1_optimization", False)
            need = needed_predictions(self.text_cfg, self.image_cfg, optimise)
            conds = [None, None, None]
            conds[IMAGE_TEXT] = positive
            conds[IMAGE_ONLY] = negative if need[1] else None
            conds[UNCONDITIONAL] = negative if need[2] else None
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            e_image_text = out[IMAGE_TEXT]
            e_image = out[IMAGE_ONLY] if need[1] else None
            e_none = out[UNCONDITIONAL] if need[2] else None
            result = combined_guidance(e_none, e_image, e_image_text, self.text_cfg, self.image_cfg)
            baseline = e_none if e_none is not None else (e_image if e_image is not None else e_image_text)
            for fn in model_options.get("sampler_post_cfg_function", []):
                args = {"denoised": result, "cond": positive, "uncond": negative, "cond_scale": self.text_cfg,
                        "model": self.inner_model, "uncond_denoised": baseline, "cond_denoised": e_image_text,
                        "sigma": timestep, "model_options": model_options, "input": x}
                result = fn(args)
            return result

    _GUIDER_CLASS = DreamCacheCombinedGuider
    return _GUIDER_CLASS


def combined_guider(model_patcher, injection, positive, negative, text_cfg: float = 7.5, image_cfg: float = 5.0):
    """A GUIDER for SamplerCustomAdvanced: a clone of ``model_patcher`` carrying ``injection`` (which must target
    ``guidance.REFERENCE_CHUNKS``), with DreamCache's combined guidance over ``positive``/``negative``."""
    from .guidance import REFERENCE_CHUNKS
    from .patch import attach_injection

    text_cfg = check_number(text_cfg, "text_cfg", advice="The authors use 7.5.")
    image_cfg = check_number(image_cfg, "image_cfg", advice="The authors use 5.0.")

    if injection.chunks != frozenset(REFERENCE_CHUNKS):
        raise ValueError(f"The combined guider's injection must target chunks {REFERENCE_CHUNKS}, "
                         f"not {sorted(injection.chunks) if injection.chunks is not None else 'all'}.")
    guider = combined_guider_class()(attach_injection(model_patcher.clone(), injection))
    guider.set_conds(positive, negative)
    guider.set_cfg(text_cfg, image_cfg)
    return guider


def adapter_model_patcher(adapter: torch.nn.Module, extra_device_bytes: int = 0):
    """A ComfyUI ModelPatcher around the adapter, so that ComfyUI's memory manager loads it to the device
    with the model it patches and offloads it with it (as ComfyUI's own model patches are handed over).
    Its size is the adapter's weights plus ``extra_device_bytes`` (the memory keys/values sampling holds)."""
    import comfy.model_management
    import comfy.model_patcher

    size = comfy.model_management.module_size(adapter) + int(extra_device_bytes)
    return comfy.model_patcher.ModelPatcher(adapter, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device(), size=size)
