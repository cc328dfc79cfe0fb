"""Training data for DreamCache adapters (plain torch, no ComfyUI).

The manifest (JSONL, one training triplet per line)
---------------------------------------------------
Each non-empty line is a JSON object::

    {"target": "images/0001.png",            # the image the U-Net learns to denoise (required)
     "reference": "refs/0001_ref0.png",       # the subject, ideally cut onto white (required)
     "reference_mask": "refs/0001_ref0_mask.png",  # optional: 1 (white) = subject, any size with the
                                              #   reference's aspect; background tokens leave the memory
     "caption": "a photo of a mug on a desk", # the target's prompt (required, may be "")
     "id": "0001"}                            # optional name used in reports

Relative paths are relative to the manifest's folder. Absolute paths are
allowed and used as they are (a manifest may point at images kept anywhere).
A relative path that leaves the manifest's folder (``../photos/a.png``) is
allowed as well, since ``write_manifest`` writes such paths for files beside a
manifest in a subfolder, but it is reported: ``read_manifest`` keeps the row and
adds a warning naming the line and the path, which
``python -m dreamcache_core.training.dataset --validate`` prints as a ``warning`` line
(the exit code is unchanged). Lines starting with ``#`` are comments. ``python -m dreamcache_core.training.dataset`` writes such a file
from a folder of photos; ``read_manifest`` validates every row (fields, files,
images, masks) and returns the rows it kept plus the rows it skipped, each
with the reason.

The precomputed store (a folder)
--------------------------------
``store.json`` (format name/version, sample count, model signature, what is
inside) + ``special.safetensors`` (the empty caption's text embedding and the
null reference: a white image's latent, and its cache when caches were
precomputed) + ``samples/<index // 1000>/<index>.safetensors`` holding, per sample,
``target_latent`` [C, h, w] (raw VAE latent, as in a LATENT), ``reference_latent``,
optional ``reference_mask`` [H, W], ``text_cond`` [T, D], optional ``text_pooled``
and optionally the reference cache (``cache.features.<layer>``,
``cache.token_mask.<layer>``). Training from a store costs U-Net passes only
(plus the t = 1 reference pass when caches were not precomputed).

Randomness
----------
Everything random in a training step (the order of samples, timestep, noise,
caption and reference dropout, the reference's online augmentation) comes from
counter-based generators keyed by (seed, draw number), never from global RNG state, so a run resumed from a
checkpoint draws exactly what the uninterrupted run would have drawn, and the
draws do not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..io.image_files import check_image_file, load_mask
from ..method.cache import DreamCache

MANIFEST_FIELDS = ("target", "reference", "reference_mask", "caption", "id")
REQUIRED_FIELDS = ("target", "reference", "caption")
STORE_FORMAT = "dreamcache-training-store"
STORE_VERSION = "1"
SAMPLES_PER_FOLDER = 1000  # precomputed samples per sub-folder of samples/


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestRow:
    """One validated training triplet; paths are absolute."""

    index: int          # position among the kept rows (the sample index used for seeds and the store)
    line: int           # 1-based line number in the manifest
    target: str
    reference: str
    caption: str
    reference_mask: Optional[str] = None
    id: str = ""

    def to_json(self, relative_to: Optional[str] = None) -> dict:
        def rel(path):
            return os.path.relpath(path, relative_to) if (path and relative_to) else path
        data = {"target": rel(self.target), "reference": rel(self.reference), "caption": self.caption}
        if self.reference_mask:
            data["reference_mask"] = rel(self.reference_mask)
        if self.id:
            data["id"] = self.id
        return data


class UnusableRow(ValueError):
    """A row found broken only when its files are read (a corrupt image, an empty caption, an empty mask)."""


#: what reading a broken row raises (PIL raises OSError / SyntaxError subclasses for broken files)
BROKEN_ROW_ERRORS = (OSError, SyntaxError, UnusableRow)


@dataclass(frozen=True)
class SkippedRow:
    line: int
    reason: str
    id: str = ""

    def __str__(self):
        name = f" ({self.id})" if self.id else ""
        return f"line {self.line}{name}: {self.reason}"


@dataclass
class Manifest:
    path: str
    rows: list
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # rows kept, but worth a look (paths leaving the folder)

    def report(self) -> str:
        lines = [f"{self.path}: {len(self.rows)} rows kept, {len(self.skipped)} skipped"]
        lines += [f"  skipped {row}" for row in self.skipped]
        lines += [f"  warning {warning}" for warning in self.warnings]
        return "\n".join(lines)


def mask_problem(path: str, reference_size: Optional[tuple] = None) -> Optional[str]:
    """None when the mask marks some subject, else the reason it is unusable."""
    problem = check_image_file(path, "reference_mask")
    if problem:
        return problem
    mask = load_mask(path)
    if not bool((mask >= 0.5).any()):
        return f"reference_mask is empty (no pixel is white enough to count as subject): {path}"
    if reference_size is not None:
        height, width = mask.shape
        ref_height, ref_width = reference_size
        if abs(height / width - ref_height / ref_width) > 0.02:
            return (f"reference_mask is {width}x{height} but the reference is {ref_width}x{ref_height} "
                    f"(another aspect ratio): {path}")
    return None


def parse_manifest_line(text: str, line: int, base_dir: str, check_files: bool = True,
                        warnings: Optional[list] = None):
    """A ``ManifestRow`` (index -1) or a ``SkippedRow`` saying what is wrong with this line; relative paths
    leaving ``base_dir`` are reported in ``warnings`` (when given)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return SkippedRow(line, f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(data, dict):
        return SkippedRow(line, "not a JSON object")
    row_id = str(data.get("id", "")) if data.get("id") is not None else ""
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if missing:
        return SkippedRow(line, f"missing field(s) {', '.join(missing)}", row_id)
    unknown = sorted(set(data) - set(MANIFEST_FIELDS))
    if unknown:
        return SkippedRow(line, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(MANIFEST_FIELDS)})", row_id)
    for name in ("target", "reference", "caption", "reference_mask"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            return SkippedRow(line, f"field {name} must be a string, got {type(value).__name__}", row_id)
    for name in ("target", "reference"):
        if not data[name].strip():
            return SkippedRow(line, f"field {name} is empty", row_id)

    def absolute(path):
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))

    if warnings is not None:
        warnings.extend(escaping_paths(data, line, base_dir))
    target = absolute(data["target"])
    reference = absolute(data["reference"])
    mask = absolute(data["reference_mask"]) if data.get("reference_mask") else None
    if check_files:
        for path, what in ((target, "target"), (reference, "reference")):
            problem = check_image_file(path, what)
            if problem:
                return SkippedRow(line, problem, row_id)
        if mask:
            from PIL import Image

            with Image.open(reference) as image:
                reference_size = (image.size[1], image.size[0])
            problem = mask_problem(mask, reference_size)
            if problem:
                return SkippedRow(line, problem, row_id)
    return ManifestRow(-1, line, target, reference, data["caption"], mask, row_id)


def escaping_paths(data: dict, line: int, base_dir: str) -> list[str]:
    """One warning per relative path of the row that leads out of ``base_dir`` (absolute paths are not reported)."""
    found = []
    for name in ("target", "reference", "reference_mask"):
        value = data.get(name)
        if not value or os.path.isabs(value):
            continue
        inside = os.path.relpath(os.path.normpath(os.path.join(base_dir, value)), base_dir)
        if inside == os.pardir or inside.startswith(os.pardir + os.sep):
            found.append(f"line {line}: {name} '{value}' leaves the manifest's folder {base_dir}. It is used, but check "
                         "that it points where you mean; write an absolute path to say so.")
    return found


def read_manifest(path: str, check_files: bool = True) -> Manifest:
    """Parse and validate a JSONL manifest; every bad row is skipped with its reason."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Manifest not found: {path}. Build one with `python -m dreamcache_core.training.dataset`.")
    base_dir = os.path.dirname(os.path.abspath(path))
    rows, skipped, warnings = [], [], []
    with open(path, encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            parsed = parse_manifest_line(text, line_number, base_dir, check_files, warnings)
            if isinstance(parsed, SkippedRow):
                skipped.append(parsed)
            else:
                rows.append(ManifestRow(len(rows), parsed.line, parsed.target, parsed.reference, parsed.caption,
                                        parsed.reference_mask, parsed.id))
    return Manifest(os.path.abspath(path), rows, skipped, warnings)


def write_manifest(rows: Iterable, path: str) -> None:
    """Write rows (``ManifestRow`` or dicts) as JSONL with paths relative to the manifest's folder."""
    base_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(base_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            data = row.to_json(base_dir) if isinstance(row, ManifestRow) else row
            handle.write(json.dumps(data, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Image preparation for training
# --------------------------------------------------------------------------

def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W, C] -> [size, size, C]: shorter side to ``size`` (antialiased bilinear), centre crop."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    planar = image.permute(2, 0, 1)[None].float()
    if (new_height, new_width) != (height, width):
        planar = F.interpolate(planar, size=(new_height, new_width), mode="bilinear", align_corners=False,
                               antialias=scale < 1).clamp(0, 1)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return planar[0, :, top:top + size, left:left + size].permute(1, 2, 0).contiguous()


def pad_to_square(image: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """[H, W, C] -> square, centred, padded with ``fill`` (white for references, 0 for masks)."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = torch.full((side, side, image.shape[2]), fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def prepare_reference(image: torch.Tensor, mask: Optional[torch.Tensor], size: int):
    """Reference [H, W, 3] (+ mask [H, W]) -> square ``size`` (padded with white / 0, then resized)."""
    square = resize_center_crop(pad_to_square(image, 1.0), size)
    if mask is None:
        return square, None
    if tuple(mask.shape) != tuple(image.shape[:2]):
        mask = F.interpolate(mask[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    square_mask = resize_center_crop(pad_to_square(mask[..., None], 0.0), size)[..., 0]
    return square, square_mask


# --------------------------------------------------------------------------
# Counter-based randomness
# --------------------------------------------------------------------------

def mix_seed(*parts) -> int:
    """A 63-bit seed from any ints/strings (stable across runs, machines and Python versions)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(str(part).encode() + b"\x00")
    return struct.unpack("<Q", digest.digest())[0] & ((1 << 63) - 1)


def generator_for(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def epoch_permutation(seed: int, epoch: int, count: int) -> torch.Tensor:
    return torch.randperm(count, generator=generator_for("order", seed, epoch))


def sample_index(seed: int, draw: int, count: int) -> int:
    """The dataset index of the ``draw``-th sample of the (infinite, epoch-shuffled) stream."""
    epoch, position = divmod(draw, count)
    return int(epoch_permutation(seed, epoch, count)[position])


def encode_seed(index: int) -> int:
    """Seed of the t = 1 noise of sample ``index``'s reference (Encode's seed input): fixed per sample, so
    precomputed caches and on-the-fly ones are the same and can be shared by training runs."""
    return int(index)


@dataclass(frozen=True)
class SampleDraw:
    """What one sample of one step draws: where it comes from and its randomness."""

    draw: int
    index: int
    timestep: int
    drop_caption: bool
    drop_reference: bool
    generator_seed: int
    augment_seed: Optional[int] = None  # seeds the reference's online augmentation (None: the unaugmented reference)

    def augment_generator(self) -> Optional[torch.Generator]:
        return None if self.augment_seed is None else torch.Generator().manual_seed(self.augment_seed)

    def noise(self, shape) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.generator_seed)
        return torch.randn(tuple(shape), generator=generator)


def draw_sample(seed: int, draw: int, count: int, caption_dropout: float, reference_dropout: float,
                timestep_range: tuple = (0, 999)) -> SampleDraw:
    generator = generator_for("sample", seed, draw)
    u_caption, u_reference = torch.rand(2, generator=generator).tolist()
    low, high = timestep_range
    timestep = int(torch.randint(int(low), int(high) + 1, (1,), generator=generator))
    noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return SampleDraw(draw, sample_index(seed, draw, count), timestep, u_caption < caption_dropout,
                      u_reference < reference_dropout, noise_seed, mix_seed("reference augmentation", seed, draw))


# --------------------------------------------------------------------------
# Prepared samples and the precomputed store
# --------------------------------------------------------------------------

@dataclass
class PreparedSample:
    """One sample in latent space: everything a step needs except (optionally) the reference cache."""

    target_latent: torch.Tensor              # [C, h, w], raw VAE latent (what a LATENT dict holds)
    reference_latent: torch.Tensor           # [C, h', w']
    text_cond: torch.Tensor                  # [T, D]
    text_pooled: Optional[torch.Tensor] = None
    reference_mask: Optional[torch.Tensor] = None   # [H, W] in 0..1
    cache: object = None                     # a DreamCache when precomputed
    caption: str = ""


@dataclass
class SpecialInputs:
    """The empty caption (caption dropout; the caching pass's text) and the null reference (reference dropout)."""

    empty_cond: torch.Tensor
    empty_pooled: Optional[torch.Tensor]
    null_reference_latent: torch.Tensor
    null_cache: object = None


def _cache_tensors(cache, prefix="cache.") -> dict:
    out = {f"{prefix}features.{k}": v for k, v in cache.features.items()}
    out.update({f"{prefix}token_mask.{k}": v.to(torch.uint8) for k, v in cache.token_masks.items()})
    return out


def _cache_from_tensors(tensors: dict, metadata: dict, prefix="cache."):
    features = {k[len(prefix + "features."):]: v for k, v in tensors.items() if k.startswith(prefix + "features.")}
    if not features:
        return None
    masks = {k[len(prefix + "token_mask."):]: v.bool() for k, v in tensors.items()
             if k.startswith(prefix + "token_mask.")}
    return DreamCache(features, masks, metadata)


class PrecomputedStore:
    """Read/write the precomputed folder described in the module docstring."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.info: dict = {}
        info_path = os.path.join(self.root, "store.json")
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as handle:
                self.info = json.load(handle)
            if self.info.get("format") != STORE_FORMAT:
                raise ValueError(f"{info_path} is not a DreamCache training store (format {self.info.get('format')!r}).")
            if str(self.info.get("version")) != STORE_VERSION:
                raise ValueError(f"{info_path} has store version {self.info.get('version')}; this pack reads "
                                 f"{STORE_VERSION}. Precompute it again.")

    @staticmethod
    def is_store(path: str) -> bool:
        return os.path.isfile(os.path.join(path, "store.json"))

    def __len__(self):
        return int(self.info.get("count", 0))

    @property
    def has_caches(self) -> bool:
        return bool(self.info.get("has_caches"))

    def sample_path(self, index: int) -> str:
        """``samples/<index // SAMPLES_PER_FOLDER>/<index>.safetensors`` (a few thousand files per folder, also
        for hundreds of thousands of samples); stores written before that layout keep theirs flat in samples/."""
        nested = os.path.join(self.root, "samples", f"{index // SAMPLES_PER_FOLDER:05d}", f"{index:08d}.safetensors")
        if not os.path.isfile(nested):
            flat = os.path.join(self.root, "samples", f"{index:08d}.safetensors")
            if os.path.isfile(flat):
                return flat
        return nested

    @property
    def reference_variants(self) -> int:
        """How many augmented references each sample holds (1 for stores written without ``--augment-variants``)."""
        return max(1, int(self.info.get("reference_variants", 1)))

    def write_sample(self, index: int, sample: PreparedSample, variants: tuple = ()) -> None:
        """Write ``sample``; ``variants`` are further PreparedSamples whose reference (latent, mask, cache) are
        stored as reference variants 1, 2, ... (``variant.<k>.`` keys) beside the sample's own (variant 0)."""
        from safetensors.torch import save_file

        tensors = {"target_latent": sample.target_latent, "text_cond": sample.text_cond}
        if sample.text_pooled is not None:
            tensors["text_pooled"] = sample.text_pooled
        metadata = {"caption": sample.caption}
        for number, variant in enumerate((sample,) + tuple(variants)):
            prefix = f"variant.{number}." if number else ""
            tensors[prefix + "reference_latent"] = variant.reference_latent
            if variant.reference_mask is not None:
                tensors[prefix + "reference_mask"] = variant.reference_mask
            if variant.cache is not None:
                tensors.update(_cache_tensors(variant.cache, prefix + "cache."))
                metadata[prefix + "cache_metadata"] = json.dumps(variant.cache.metadata, sort_keys=True)
        if variants:
            metadata["reference_variants"] = str(1 + len(variants))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = self.sample_path(index)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)

    def read_sample(self, index: int, variant: int = 0) -> PreparedSample:
        """Sample ``index`` with its reference variant ``variant`` (only that variant's tensors are read)."""
        from safetensors import safe_open

        path = self.sample_path(index)
        if not os.path.isfile(path):
            raise ValueError(f"Sample {index} is missing from the precomputed store {self.root} ({path}); "
                             "precompute it again.")
        prefix = f"variant.{variant}." if variant else ""
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            held = int(metadata.get("reference_variants", 1))
            if not 0 <= variant < held:
                raise ValueError(f"Sample {index} of {self.root} holds {held} reference variant(s), not variant "
                                 f"{variant}; precompute it again.")
            shared = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("variant.")
                      and k in ("target_latent", "text_cond", "text_pooled")}
            own = {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys()
                   if k.startswith(prefix) and (variant or not k.startswith("variant."))
                   and k[len(prefix):] not in ("target_latent", "text_cond", "text_pooled")}
        cache = _cache_from_tensors(own, json.loads(metadata.get(prefix + "cache_metadata", "{}")))
        return PreparedSample(shared["target_latent"], own["reference_latent"], shared["text_cond"],
                              shared.get("text_pooled"), own.get("reference_mask"), cache,
                              metadata.get("caption", ""))

    def write_special(self, special: SpecialInputs) -> None:
        from safetensors.torch import save_file

        tensors = {"empty_cond": special.empty_cond, "null_reference_latent": special.null_reference_latent}
        if special.empty_pooled is not None:
            tensors["empty_pooled"] = special.empty_pooled
        metadata = {}
        if special.null_cache is not None:
            tensors.update(_cache_tensors(special.null_cache, "null_cache."))
            metadata["cache_metadata"] = json.dumps(special.null_cache.metadata, sort_keys=True)
        os.makedirs(self.root, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(self.root, "special.safetensors"), metadata=metadata)

    def read_special(self) -> SpecialInputs:
        from safetensors import safe_open

        with safe_open(os.path.join(self.root, "special.safetensors"), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        null_cache = _cache_from_tensors(tensors, json.loads(metadata.get("cache_metadata", "{}")), "null_cache.")
        return SpecialInputs(tensors["empty_cond"], tensors.get("empty_pooled"), tensors["null_reference_latent"],
                             null_cache)

    def write_info(self, count: int, has_caches: bool, extra: Optional[dict] = None) -> None:
        self.info = {"format": STORE_FORMAT, "version": STORE_VERSION, "count": int(count),
                     "has_caches": bool(has_caches)}
        self.info.update(extra or {})
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, "store.json"), "w", encoding="utf-8") as handle:
            json.dump(self.info, handle, indent=1, sort_keys=True)
