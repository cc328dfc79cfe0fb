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
from .reference_augmentation import augment_reference, canonical_reference
from .precomputed_store import PrecomputedStore, PreparedSample, SpecialInputs
from .sample_draws import SampleDraw, encode_seed, generator_for
from .sample_images import prepare_reference, resize_center_crop
from .training_manifest import BROKEN_ROW_ERRORS, Manifest
from ..comfy_bridge import encode_reference
from ..method.layers import model_signature

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
    """Samples of a validated manifest (or a sharded one, or an authors'-layout folder), loaded and encoded when
    asked for.

    The reference is prepared one of three ways: as it is (padded to a square; the default for manifests);
    ``cut_out``: the subject on white, cropped to its mask and centred (``canonical_reference``), for sources
    whose references are whole photos with a mask; or, with ``augment`` (``reference_augmentation``), augmented
    from the generator of the draw that asks for it (``prepared(index, draw)``) or of a precomputed variant
    (``prepared(index, variant=k)``), and cut out as above when neither is given.

    A row whose files turn out broken when read (a corrupt image, an empty caption or mask; rows are
    validated lazily for large sets) is skipped: the next usable row takes its place (always the same one,
    so resumed runs still match), and the reason is logged once and kept in ``skipped``.
    """

    def __init__(self, manifest: Manifest, image_encoder: Callable, text_encoder: Callable, resolution: int,
                 reference_resolution: Optional[int] = None, use_masks: bool = True, augment=None,
                 cut_out: bool = False, log: Callable = print):
        if not manifest.rows:
            raise ValueError(f"The manifest {manifest.path} has no usable rows.\n{manifest.report()}")
        self.manifest = manifest
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.resolution = int(resolution)
        self.reference_resolution = int(reference_resolution or resolution)
        self.use_masks = use_masks
        self.augment = augment
        self.cut_out = bool(cut_out or augment is not None)
        self.log = log
        self.skipped: dict = {}  # row index -> reason, for rows found broken when read
        self._special = None
        self.has_caches = False

    def __len__(self):
        return len(self.manifest.rows)

    def describe(self) -> dict:
        data = {"source": "manifest", "manifest": self.manifest.path, "resolution": self.resolution,
                "reference_resolution": self.reference_resolution, "use_masks": self.use_masks}
        if self.augment is not None:
            data.update(self.augment.describe())
        elif self.cut_out:
            data["reference"] = "cut out on white"
        return data

    def skip_report(self) -> str:
        """One line per row skipped while reading (empty when none was)."""
        if not self.skipped:
            return ""
        lines = [f"{len(self.skipped)} row(s) skipped when read (the next usable row took their place):"]
        lines += [f"  skipped {reason}" for _, reason in sorted(self.skipped.items())[:50]]
        if len(self.skipped) > 50:
            lines.append(f"  ... and {len(self.skipped) - 50} more")
        return "\n".join(lines)

    def _row_problem(self, index: int, error: BaseException) -> str:
        try:
            name = self.manifest.rows[index].id
        except BROKEN_ROW_ERRORS:
            name = ""
        return f"row {index}{f' ({name})' if name else ''}: {error}"

    def usable(self, index: int, attempt: Callable):
        """``attempt(i)`` for the first row i = index, index + 1, ... that reads; broken rows are recorded."""
        count = len(self)
        for offset in range(count):
            current = (index + offset) % count
            if current in self.skipped:
                continue
            try:
                return current, attempt(current)
            except BROKEN_ROW_ERRORS as error:
                self.skipped[current] = self._row_problem(current, error)
                self.log(f"skipped {self.skipped[current]}")
        raise ValueError(f"No row of {self.manifest.path} can be read.\n{self.skip_report()}")

    def reference_image(self, row, generator: Optional[torch.Generator]):
        """(reference [S, S, 3], mask [S, S] or None) of ``row``, augmented from ``generator`` when given."""
        image = load_image(row.reference, transparency="white")
        mask = load_mask(row.reference_mask) if row.reference_mask else None
        if self.augment is not None and generator is not None:
            reference, mask, _ = augment_reference(image, mask, self.reference_resolution, generator, self.augment)
        elif self.cut_out:
            reference, mask = canonical_reference(image, mask, self.reference_resolution)
        else:
            reference, mask = prepare_reference(image, mask, self.reference_resolution)
        return reference, (mask if (self.use_masks and row.reference_mask) else None)

    def _prepare(self, index: int, generator: Optional[torch.Generator]) -> PreparedSample:
        row = self.manifest.rows[index]
        target = resize_center_crop(load_image(row.target, transparency="white"), self.resolution)
        reference, mask = self.reference_image(row, generator)
        cond, pooled = self.text_encoder(row.caption)
        return PreparedSample(self.image_encoder(target), self.image_encoder(reference), cond, pooled, mask,
                              None, row.caption)

    def prepared(self, index: int, draw: Optional[SampleDraw] = None, variant: Optional[int] = None) -> PreparedSample:
        """Sample ``index``; with augmentation its reference is drawn from ``draw``'s generator, or from
        precomputed ``variant``'s (keyed on the row and the variant number), else cut out without randomness."""
        _, sample = self.usable(index, lambda i: self._prepare(i, self.reference_generator(i, draw, variant)))
        return sample

    def reference_generator(self, index: int, draw: Optional[SampleDraw], variant: Optional[int]):
        """A fresh generator for row ``index``'s augmentation (None: no augmentation or no randomness asked for)."""
        if self.augment is None:
            return None
        if draw is not None:
            return draw.augment_generator()
        return None if variant is None else generator_for("reference variant", index, variant)

    def prepared_variants(self, index: int, count: int) -> list:
        """``count`` samples of row ``index`` with reference variants 0..count-1 (one target and caption)."""
        row_index, first = self.usable(index, lambda i: self._prepare(i, self.reference_generator(i, None, 0)))
        samples = [first]
        row = self.manifest.rows[row_index]
        for number in range(1, count):
            reference, mask = self.reference_image(row, self.reference_generator(row_index, None, number))
            samples.append(PreparedSample(first.target_latent, self.image_encoder(reference), first.text_cond,
                                          first.text_pooled, mask, None, first.caption))
        return samples

    def special(self) -> SpecialInputs:
        if self._special is None:
            cond, pooled = self.text_encoder("")
            white = torch.ones(self.reference_resolution, self.reference_resolution, 3)
            self._special = SpecialInputs(cond, pooled, self.image_encoder(white))
        return self._special


class StoreSource:
    """Samples of a precomputed store; a store with K reference variants per sample gives each draw the variant
    its augmentation generator picks (uniformly), so resumed runs pick the same."""

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

    def variant_of(self, draw: Optional[SampleDraw]) -> int:
        variants = self.store.reference_variants
        if draw is None or variants == 1 or draw.augment_seed is None:
            return 0
        return int(torch.randint(variants, (1,), generator=draw.augment_generator()))

    def prepared(self, index: int, draw: Optional[SampleDraw] = None, variant: Optional[int] = None) -> PreparedSample:
        sample = self.store.read_sample(index, self.variant_of(draw) if variant is None else variant)
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

    mask = sample.reference_mask[None] if (use_masks and sample.reference_mask is not None) else None
    empty = [[special.empty_cond[None], {} if special.empty_pooled is None else {"pooled_output": special.empty_pooled[None]}]]
    with torch.no_grad():
        return encode_reference(model_patcher, sample.reference_latent[None].float(), empty, encode_seed(index), mask)


def null_reference_cache(model_patcher, special: SpecialInputs):
    """The cache of the null reference (a white image, no mask): what reference dropout injects."""
    if special.null_cache is not None:
        return special.null_cache

    empty = [[special.empty_cond[None], {} if special.empty_pooled is None else {"pooled_output": special.empty_pooled[None]}]]
    with torch.no_grad():
        special.null_cache = encode_reference(model_patcher, special.null_reference_latent[None].float(), empty,
                                              NULL_REFERENCE_SEED)
    return special.null_cache


def precompute(source, store_dir: str, model_patcher=None, caches: bool = False, rank: int = 0, world: int = 1,
               progress: bool = True, log=print, variants: int = 1) -> PrecomputedStore:
    """Write ``source`` (usually a ManifestSource) as a precomputed store; with ``caches`` also each
    reference's cache (needs ``model_patcher``; the same Encode pass training would run). With ``variants``
    K > 1 (an augmenting source) each sample holds K augmented references, the trainer draws one per draw.
    With several processes each writes every ``world``-th sample; rank 0 writes the store description."""
    if caches and model_patcher is None:
        raise ValueError("Precomputing reference caches needs the base model.")
    variants = int(variants)
    if variants < 1:
        raise ValueError(f"--augment-variants must be at least 1 (got {variants}).")
    if variants > 1 and getattr(source, "augment", None) is None:
        raise ValueError("--augment-variants above 1 needs augmented references (--augment authors): without "
                         "augmentation every variant would be the same.")
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
    augmenting = getattr(source, "augment", None) is not None
    for index in indices:
        samples = source.prepared_variants(index, variants) if augmenting else [source.prepared(index)]
        if caches:
            for sample in samples:
                sample.cache = reference_cache(model_patcher, sample, index, special, source.use_masks)
        store.write_sample(index, samples[0], tuple(samples[1:]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if rank == 0:
        store.write_special(special)
        extra = {"source": source.describe(), "reference_variants": variants}
        if model_patcher is not None:
            extra["signature"] = model_signature(model_patcher.model.diffusion_model)
        store.write_info(len(source), caches, extra)
        log(f"precomputed {len(source)} samples into {os.path.abspath(store_dir)}"
            + (f" with {variants} augmented references each" if variants > 1 else "")
            + (" with reference caches" if caches else ""))
    return store
