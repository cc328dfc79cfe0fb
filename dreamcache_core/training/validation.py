"""Validation during training: a grid of samples and the held-out reference gap, every N steps.

Held-out data: the first ``count`` samples of a second training source
(``train --validation-data``, any --data format the trainer reads), fixed for
the whole run.

* Grid (``<output-dir>/validation/step-XXXXXXX.png``): one row per (sample,
  prompt), three tiles: the sample's reference (its latent decoded), the image
  made with the adapter, and the plain base's image at the same seed. Prompts:
  the samples' own captions, or every line of ``--validation-prompts``. Row r
  uses seed r, at every step. Sampling is generation's own ``Sampler``
  (``comfy_bridge.pipeline``: the Apply DreamCache injection, joint guidance,
  the stock KSampler path),
  on a frozen copy of the adapter, inside ``torch.inference_mode()``.
* Gap (``<output-dir>/reference_gap.csv``): ``reference_gap.reference_gap``
  with matched and shuffled references (sample i's shuffled reference is sample
  ``(i + count // 2) mod count``), the same draws at every step.

Global RNG state is restored afterwards, so validating does not change what
training draws.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..comfy_bridge.pipeline import Sampler
from .reference_gap import gap_record, reference_gap, shifted_partners
from .training_loss import conditioning_of
from .training_sources import reference_cache
from ..io.image_files import save_png

GRID_PADDING = 2  # white pixels between tiles
VALIDATION_DIR = "validation"


@dataclass
class ValidationSettings:
    every: int = 0                 # optimizer steps between validations (0 = off)
    count: int = 4                 # held-out samples
    prompts: Optional[list] = None  # None: each sample's own caption
    steps: int = 20                # sampling steps of the grid
    cfg: float = 7.5               # joint guidance scale of the grid
    sampler: str = "euler"
    scheduler: str = "normal"
    per_band: int = 2              # gap draws per sample and noise band
    grid: bool = True
    gap: bool = True


def grid_size(rows: int, columns: int, tile_height: int, tile_width: int, padding: int = GRID_PADDING) -> tuple:
    """(height, width) of a grid of rows x columns tiles with ``padding`` white pixels between tiles."""
    return rows * tile_height + (rows - 1) * padding, columns * tile_width + (columns - 1) * padding


def tile_grid(rows: list, padding: int = GRID_PADDING) -> torch.Tensor:
    """[H, W, 3] grid of ``rows`` (lists of [h, w, 3] tiles of one size), white between tiles."""
    tile_height, tile_width = rows[0][0].shape[:2]
    height, width = grid_size(len(rows), len(rows[0]), tile_height, tile_width, padding)
    grid = torch.ones(height, width, 3)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = r * (tile_height + padding), c * (tile_width + padding)
            grid[top:top + tile_height, left:left + tile_width] = tile[..., :3].float().cpu()
    return grid


def resize_tile(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image.shape[:2]) == (height, width):
        return image
    planar = image.permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(planar, size=(height, width), mode="bilinear", antialias=True,
                                           align_corners=False)[0].clamp(0, 1).permute(1, 2, 0)


class Validator:
    """Grid and gap of an adapter on fixed held-out samples of ``source`` against ``model_patcher``.

    decode: latent [C, h, w] -> image [H, W, 3] in 0..1 (the checkpoint's VAE); text_encoder: prompt ->
    (cond [T, D], pooled or None), needed only for ``settings.prompts``.
    """

    def __init__(self, model_patcher, source, settings: ValidationSettings, decode: Optional[Callable] = None,
                 text_encoder: Optional[Callable] = None, use_masks: bool = True, attention=None, autocast=None):
        if settings.count < 1 or settings.count > len(source):
            raise ValueError(f"--validation-count {settings.count} must be between 1 and the number of validation "
                             f"samples ({len(source)}).")
        if settings.grid and decode is None:
            raise ValueError("The validation grid decodes images with the checkpoint's VAE: pass --checkpoint (or "
                             "--toy-encoders for toy data).")
        if settings.prompts and text_encoder is None:
            raise ValueError("--validation-prompts needs the checkpoint's text encoder: pass --checkpoint.")
        self.model = model_patcher
        self.source = source
        self.settings = settings
        self.decode = decode
        self.text_encoder = text_encoder
        self.use_masks = use_masks
        self.attention = attention
        self.autocast = autocast
        self.partner = shifted_partners(settings.count) if settings.gap else None
        self._samples = None
        self._caches = None

    @property
    def samples(self) -> list:
        if self._samples is None:
            self._samples = [self.source.prepared(i) for i in range(self.settings.count)]
        return self._samples

    @property
    def caches(self) -> list:
        """Each held-out sample's reference cache (the frozen base's Encode pass: computed once)."""
        if self._caches is None:
            special = self.source.special()
            self._caches = [reference_cache(self.model, sample, index, special, self.use_masks)
                            for index, sample in enumerate(self.samples)]
        return self._caches

    # ------------------------------------------------------------------ gap
    def gap(self, adapter, step: Optional[int] = None) -> dict:
        """``reference_gap.gap_record`` of ``adapter`` (matched / shuffled / gap, overall and per band)."""
        results = reference_gap(self.model, adapter, self.samples, self.caches, self.partner, self.settings.per_band,
                                batch=8, modes=("matched", "shuffled"), attention=self.attention,
                                autocast=self.autocast)
        return gap_record(results, step)

    # ------------------------------------------------------------------ grid
    def prompt_rows(self) -> list:
        """[(sample index, positive CONDITIONING, prompt text)], one per grid row."""
        rows = []
        encoded = {}
        for index, sample in enumerate(self.samples):
            if not self.settings.prompts:
                rows.append((index, conditioning_of(sample.text_cond[None], _batch(sample.text_pooled)),
                             sample.caption))
                continue
            for prompt in self.settings.prompts:
                if prompt not in encoded:
                    cond, pooled = self.text_encoder(prompt)
                    encoded[prompt] = conditioning_of(cond[None], _batch(pooled))
                rows.append((index, encoded[prompt], prompt))
        return rows

    def sampler_settings(self, guidance: str) -> dict:
        s = self.settings
        return {"guidance": guidance, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "steps": s.steps,
                "cfg": s.cfg, "text_cfg": s.cfg, "image_cfg": s.cfg, "sampler": s.sampler, "scheduler": s.scheduler}

    def grid(self, adapter) -> tuple:
        """(grid [H, W, 3], tiles: [(reference, personalised, plain)] per row, the row prompts)."""
        frozen = copy.deepcopy(adapter).requires_grad_(False)  # sampling may hand it to ComfyUI's memory manager
        special = self.source.special()
        negative = conditioning_of(special.empty_cond[None], _batch(special.empty_pooled))
        plain = Sampler(self.model, None, None, self.sampler_settings("off"))
        tiles, prompts = [], []
        with torch.inference_mode():
            for row, (index, positive, prompt) in enumerate(self.prompt_rows()):
                sample = self.samples[index]
                personalised = Sampler(self.model, frozen, self.caches[index], self.sampler_settings("joint"))
                shape = tuple(sample.target_latent.shape)
                with_reference = self.decode(personalised.sample(positive, negative, [row], shape)[0])
                without = self.decode(plain.sample(positive, negative, [row], shape)[0])
                if personalised.injection is not None:
                    personalised.injection.release_device_copies()
                height, width = with_reference.shape[:2]
                reference = resize_tile(self.decode(sample.reference_latent), height, width)
                tiles.append((reference, with_reference.float().cpu(), without.float().cpu()))
                prompts.append(prompt)
        return tile_grid([list(t) for t in tiles]), tiles, prompts

    # ------------------------------------------------------------------ both, written
    def run(self, step: int, adapter, output_dir: str, log: Callable[[str], None] = print, tensorboard=None) -> dict:
        """Write the grid PNG and return the gap record of ``step`` (the caller logs it); global RNG untouched."""
        record = {}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            if self.settings.gap:
                record = self.gap(adapter, step)
                log(f"step {step}: held-out reference gap {record['gap']:.5f} (shuffled {record['shuffled']:.5f} - "
                    f"matched {record['matched']:.5f}, {100 * record['gap_fraction']:.1f} % of shuffled; low/mid/high "
                    f"{record['gap_low']:.5f} / {record['gap_mid']:.5f} / {record['gap_high']:.5f})")
            if self.settings.grid:
                grid, _, prompts = self.grid(adapter)
                path = os.path.join(output_dir, VALIDATION_DIR, f"step-{step:07d}.png")
                save_png(grid, path, {"dreamcache_validation": {"step": step, "prompts": prompts,
                                                               "columns": ["reference", "personalised", "plain"],
                                                               "seeds": list(range(len(prompts)))}},
                         quantize="round")
                if tensorboard is not None:
                    tensorboard.image("validation/grid", grid, step)
                log(f"step {step}: validation grid {path} (reference | personalised | plain)")
        return record


def _batch(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[None]
