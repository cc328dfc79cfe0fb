"""Where training samples come from: a manifest encoded on the fly, or a precomputed store.

Both give ``PreparedSample`` objects (latents + text embeddings + reference,
optionally its cache) and the ``SpecialInputs`` (empty caption, null reference).
``precompute`` turns the first into the second so that an epoch costs U-Net
passes only. Encoders are plain callables:

* image encoder: float RGB [H, W, 3] in 0..1 -> raw latent [C, h, w]
  (``ComfyImageEncoder`` wraps a ComfyUI VAE, as VAE Encode does);
* text encoder: caption -> (cond [T, D], pooled [P] or None)
  (``ComfyTextEncoder`` wraps a ComfyUI CLIP, as CLIP Text Encode does).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ..io.image_files import load_image, load_mask
from .training_data import (Manifest, PrecomputedStore, PreparedSample, SpecialInputs, encode_seed, prepare_reference,
                            resize_center_crop)

NULL_REFERENCE_SEED = 2 ** 31 - 1  # Encode seed of the null (white) reference


class ComfyImageEncoder:
    """A ComfyUI VAE as an image encoder (VAE Encode's own call)."""

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image[None, ..., :3])[0].float().cpu()


class ComfyImageDecoder:
    """A ComfyUI VAE as a decoder (VAE Decode's own call): raw latent [C, h, w] -> [H, W, 3] in 0..1."""

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent[None])[0, ..., :3].float().cpu()


class ComfyTextEncoder:
    """A ComfyUI CLIP as a text encoder (CLIP Text Encode's own call)."""

    def __init__(self, clip):
        self.clip = clip

    @torch.no_grad()
    def __call__(self, caption: str):
        tokens = self.clip.tokenize(caption)
        conditioning = self.clip.encode_from_tokens_scheduled(tokens)
        cond, options = conditioning[0][0], conditioning[0][1]
        pooled = options.get("pooled_output")
        return cond[0].float().cpu(), (None if pooled is None else pooled[0].float().cpu())


class ManifestSource:
    """Samples of a validated manifest, loaded and encoded when asked for."""

    def __init__(self, manifest: Manifest, image_encoder: Callable, text_encoder: Callable, resolution: int,
                 reference_resolution: Optional[int] = None, use_masks: bool = True):
        if not manifest.rows:
            raise ValueError(f"The manifest {manifest.path} has no usable rows.\n{manifest.report()}")
        self.manifest = manifest
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.resolution = int(resolution)
        self.reference_resolution = int(reference_resolution or resolution)
        self.use_masks = use_masks
        self._special = None
        self.has_caches = False

    def __len__(self):
        return len(self.manifest.rows)

    def describe(self) -> dict:
        return {"source": "manifest", "manifest": self.manifest.path, "resolution": self.resolution,
                "reference_resolution": self.reference_resolution, "use_masks": self.use_masks}

    def prepared(self, index: int) -> PreparedSample:
        row = self.manifest.rows[index]
        target = resize_center_crop(load_image(row.target, transparency="white"), self.resolution)
        mask = load_mask(row.reference_mask) if (row.reference_mask and self.use_masks) else None
        reference, mask = prepare_reference(load_image(row.reference, transparency="white"), mask, self.reference_resolution)
        cond, pooled = self.text_encoder(row.caption)
        return PreparedSample(self.image_encoder(target), self.image_encoder(reference), cond, pooled, mask,
                              None, row.caption)

    def special(self) -> SpecialInputs:
        if self._special is None:
            cond, pooled = self.text_encoder("")
            white = torch.ones(self.reference_resolution, self.reference_resolution, 3)
            self._special = SpecialInputs(cond, pooled, self.image_encoder(white))
        return self._special


class StoreSource:
    """Samples of a precomputed store."""

    def __init__(self, store: PrecomputedStore, use_masks: bool = True):
        if len(store) == 0:
            raise ValueError(f"The precomputed store {store.root} is empty or incomplete (no store.json count).")
        self.store = store
        self.use_masks = use_masks
        self._special = None

    @property
    def has_caches(self) -> bool:
        return self.store.has_caches

    def __len__(self):
        return len(self.store)

    def describe(self) -> dict:
        return {"source": "store", "store": self.store.root, "use_masks": self.use_masks,
                **{k: v for k, v in self.store.info.items() if k not in ("format", "version")}}

    def prepared(self, index: int) -> PreparedSample:
        sample = self.store.read_sample(index)
        if not self.use_masks:
            sample.reference_mask = None
        return sample

    def special(self) -> SpecialInputs:
        if self._special is None:
            self._special = self.store.read_special()
        return self._special


def reference_cache(model_patcher, sample: PreparedSample, index: int, special: SpecialInputs, use_masks: bool = True):
    """The reference cache of ``sample`` (precomputed, or one Encode pass at t = 1, the Encode node's code)."""
    if sample.cache is not None and (use_masks or not sample.cache.token_masks):
        return sample.cache
    from ..comfy_bridge import encode_reference

    mask = sample.reference_mask[None] if (use_masks and sample.reference_mask is not None) else None
    empty = [[special.empty_cond[None], {} if special.empty_pooled is None else {"pooled_output": special.empty_pooled[None]}]]
    with torch.no_grad():
        return encode_reference(model_patcher, sample.reference_latent[None].float(), empty, encode_seed(index), mask)


def null_reference_cache(model_patcher, special: SpecialInputs):
    """The cache of the null reference (a white image, no mask): what reference dropout injects."""
    if special.null_cache is not None:
        return special.null_cache
    from ..comfy_bridge import encode_reference

    empty = [[special.empty_cond[None], {} if special.empty_pooled is None else {"pooled_output": special.empty_pooled[None]}]]
    with torch.no_grad():
        special.null_cache = encode_reference(model_patcher, special.null_reference_latent[None].float(), empty,
                                              NULL_REFERENCE_SEED)
    return special.null_cache


def precompute(source, store_dir: str, model_patcher=None, caches: bool = False, rank: int = 0, world: int = 1,
               progress: bool = True, log=print) -> PrecomputedStore:
    """Write ``source`` (usually a ManifestSource) as a precomputed store; with ``caches`` also each
    reference's cache (needs ``model_patcher``; the same Encode pass training would run). With several
    processes each writes every ``world``-th sample; rank 0 writes the store description."""
    from ..method.layers import model_signature

    if caches and model_patcher is None:
        raise ValueError("Precomputing reference caches needs the base model.")
    store = PrecomputedStore(store_dir)
    special = source.special()
    if caches:
        null_reference_cache(model_patcher, special)
    indices = range(rank, len(source), world)
    bar = None
    if progress and rank == 0:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(indices), desc="precompute", unit="sample")
        except ImportError:
            bar = None
    for index in indices:
        sample = source.prepared(index)
        if caches:
            sample.cache = reference_cache(model_patcher, sample, index, special, source.use_masks)
        store.write_sample(index, sample)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if rank == 0:
        store.write_special(special)
        extra = {"source": source.describe()}
        if model_patcher is not None:
            extra["signature"] = model_signature(model_patcher.model.diffusion_model)
        store.write_info(len(source), caches, extra)
        log(f"precomputed {len(source)} samples into {os.path.abspath(store_dir)}"
            + (" with reference caches" if caches else ""))
    return store
