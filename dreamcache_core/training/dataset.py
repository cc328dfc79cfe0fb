"""Build a DreamCache training manifest from a folder of photos (BootPIG-style).

    python -m dreamcache_core.training.dataset --images photos/ --out data/ [--captions captions.csv]
        [--sam models/sams/sam_vit_b_01ec64.pth] [--references-per-image 1] [--reference-size 512]
    python -m dreamcache_core.training.dataset --validate data/manifest.jsonl

For every image of ``--images`` (sorted; files named ``<stem><mask-suffix>.png``
are masks, not images):

1. caption: ``<stem>.txt`` beside the image, else the row of ``--captions``
   (a CSV with columns ``file`` (or ``image``) and ``caption``);
2. subject mask: ``<stem><mask-suffix>.<ext>`` beside the image (white =
   subject), else SAM (``--sam``; segment-anything, prompted with the
   central salient object, see ``sam_segmenter.segment_subject``);
3. reference: the subject cut onto a white square (``reference_mask.cut_subject_on_white``),
   then augmented (``augment_reference``: horizontal flip, scale, shift, small
   rotation, white fill) so the adapter cannot copy pixels; written to
   ``<out>/references/<stem>_ref<k>.png`` with its mask ``..._mask.png``;
4. one manifest row per reference: target = the original photo.

Every image is validated (readable, has a caption, has a non-empty mask, the
subject survives augmentation); what is skipped is listed with the reason in
the report (printed and written to ``<out>/skipped.txt``). The manifest format
is documented in ``training_manifest``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..io.image_files import IMAGE_EXTENSIONS, check_image_file, load_image, load_mask, save_png
from ..masking.sam_segmenter import SamSegmenter
from .sample_draws import generator_for
from .training_manifest import ManifestRow, read_manifest, write_manifest
from ..comfy_bridge.model_files import resolve_model_file
from ..masking.reference_mask import EmptyMaskError, resize_mask, cut_subject_on_white


# --------------------------------------------------------------------------
# Reference augmentation
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentSettings:
    flip_probability: float = 0.5
    scale_range: tuple = (0.75, 1.05)     # subject size multiplier
    shift_fraction: float = 0.1           # max shift, as a fraction of the side, each axis
    max_rotation_degrees: float = 10.0


def augment_reference(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                      settings: AugmentSettings = AugmentSettings()):
    """Randomly flip, scale, shift and slightly rotate a subject-on-white reference and its mask.

    image [S, S, 3] in 0..1 (white background), mask [S, S] in 0..1. Uncovered area becomes white
    (image) and 0 (mask). Deterministic for a given generator state; returns (image, mask).
    """
    if image.ndim != 3 or image.shape[-1] != 3 or tuple(mask.shape) != tuple(image.shape[:2]):
        raise ValueError(f"augment_reference expects image [H, W, 3] and mask [H, W], got {tuple(image.shape)} and "
                         f"{tuple(mask.shape)}.")
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    flip = u[0] < settings.flip_probability
    low, high = settings.scale_range
    scale = low + (high - low) * u[1]
    shift_x = (2 * u[2] - 1) * settings.shift_fraction * 2  # normalised coordinates span 2
    shift_y = (2 * u[3] - 1) * settings.shift_fraction * 2
    angle = math.radians((2 * u[4] - 1) * settings.max_rotation_degrees)
    planes = torch.cat([image.permute(2, 0, 1) - 1.0, mask[None]], dim=0)[None].float()  # white -> 0 for padding
    if flip:
        planes = planes.flip(-1)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # output coordinate -> input coordinate (inverse of: scale, rotate, then shift)
    theta = torch.tensor([[cos, -sin, -(cos * shift_x - sin * shift_y)],
                          [sin, cos, -(sin * shift_x + cos * shift_y)]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, list(planes.shape), align_corners=False)
    warped = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    out_image = (warped[:3] + 1.0).clamp(0, 1).permute(1, 2, 0).contiguous()
    out_mask = warped[3].clamp(0, 1).contiguous()
    return out_image, out_mask


# --------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------

@dataclass
class BuildReport:
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (file, reason)

    def text(self) -> str:
        lines = [f"{len(self.rows)} manifest rows written, {len(self.skipped)} images skipped"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def read_captions_csv(path: str) -> dict:
    """file name (and stem) -> caption, from a CSV with columns file|image and caption."""
    captions = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = {name.lower().strip(): name for name in (reader.fieldnames or [])}
        file_field = fields.get("file") or fields.get("image") or fields.get("filename")
        caption_field = fields.get("caption") or fields.get("text") or fields.get("prompt")
        if not file_field or not caption_field:
            raise ValueError(f"{path} needs a header with a 'file' (or 'image') column and a 'caption' column; "
                             f"found {reader.fieldnames}.")
        for row in reader:
            name = (row.get(file_field) or "").strip()
            if name:
                caption = (row.get(caption_field) or "").strip()
                captions[os.path.basename(name)] = caption
                captions.setdefault(os.path.splitext(os.path.basename(name))[0], caption)
    return captions


def find_mask_beside(image_path: str, suffix: str) -> Optional[str]:
    stem = os.path.splitext(image_path)[0]
    for extension in IMAGE_EXTENSIONS:
        candidate = stem + suffix + extension
        if os.path.isfile(candidate):
            return candidate
    return None


def list_images(folder: str, mask_suffix: str) -> list:
    if not os.path.isdir(folder):
        raise ValueError(f"--images {folder} is not a folder (it does not exist, or is a file). Give the folder "
                         "holding the photos.")
    names = []
    for name in sorted(os.listdir(folder)):
        stem, extension = os.path.splitext(name)
        if extension.lower() in IMAGE_EXTENSIONS and not stem.endswith(mask_suffix):
            names.append(os.path.join(folder, name))
    return names


def build_dataset(images_dir: str, out_dir: str, captions_csv: Optional[str] = None,
                  segmenter: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, mask_suffix: str = "_mask",
                  references_per_image: int = 1, reference_size: int = 512, margin: float = 0.1, seed: int = 0,
                  augment: AugmentSettings = AugmentSettings(), manifest_name: str = "manifest.jsonl",
                  log=print) -> BuildReport:
    """Build ``<out_dir>/<manifest_name>`` and the references; see the module docstring."""
    captions = read_captions_csv(captions_csv) if captions_csv else {}
    report = BuildReport()
    reference_dir = os.path.join(out_dir, "references")
    for image_number, path in enumerate(list_images(images_dir, mask_suffix)):
        name = os.path.basename(path)
        stem = os.path.splitext(name)[0]
        problem = check_image_file(path, "image")
        if problem:
            report.skipped.append((name, problem))
            continue
        caption_file = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(caption_file):
            with open(caption_file, encoding="utf-8") as handle:
                caption = handle.read().strip()
        elif name in captions or stem in captions:
            caption = captions.get(name, captions.get(stem))
        else:
            report.skipped.append((name, f"no caption ({stem}.txt beside it, or a row in --captions)"))
            continue
        image = load_image(path, transparency="white")
        mask_path = find_mask_beside(path, mask_suffix)
        if mask_path:
            problem = check_image_file(mask_path, "mask")
            if problem:
                report.skipped.append((name, problem))
                continue
            mask = load_mask(mask_path)
            if tuple(mask.shape) != tuple(image.shape[:2]):
                if abs(mask.shape[0] / mask.shape[1] - image.shape[0] / image.shape[1]) > 0.02:
                    report.skipped.append((name, f"mask {os.path.basename(mask_path)} has another aspect ratio "
                                                 "than the image"))
                    continue
                mask = resize_mask(mask, image.shape[0], image.shape[1])
        elif segmenter is not None:
            mask = segmenter(image)
        else:
            report.skipped.append((name, f"no mask ({stem}{mask_suffix}.png beside it) and no SAM model (--sam)"))
            continue
        try:
            add_references(report, path, image, mask, caption, reference_dir, references_per_image, reference_size,
                           margin, seed, augment)
        except EmptyMaskError:
            report.skipped.append((name, "the subject mask is empty" + (" (SAM found nothing)" if not mask_path else "")))
    write_report(report, out_dir, manifest_name)
    log(report.text())
    return report


def add_references(report: BuildReport, target_path: str, image: torch.Tensor, mask: torch.Tensor, caption: str,
                   reference_dir: str, references_per_image: int, reference_size: int, margin: float, seed: int,
                   augment: AugmentSettings = AugmentSettings()) -> int:
    """Cut the subject onto white, write ``references_per_image`` augmented references of it and add their rows.

    References are ``<reference_dir>/<stem>_ref<k>.png`` (+ ``_mask.png``), augmented with the generator
    ("augment", seed, stem, k). Raises ``reference_mask.EmptyMaskError`` when the mask is empty; returns the
    number of rows added (a reference whose subject left the frame is listed as skipped instead).
    """
    name = os.path.basename(target_path)
    stem = os.path.splitext(name)[0]
    cut_image, cut_mask = cut_subject_on_white(image, mask, reference_size, margin)
    added = 0
    for k in range(references_per_image):
        generator = generator_for("augment", seed, stem, k)
        ref_image, ref_mask = augment_reference(cut_image, cut_mask, generator, augment)
        if not bool((ref_mask >= 0.5).any()):
            report.skipped.append((f"{name} reference {k}", "the subject left the frame after augmentation"))
            continue
        ref_path = os.path.join(reference_dir, f"{stem}_ref{k}.png")
        ref_mask_path = os.path.join(reference_dir, f"{stem}_ref{k}_mask.png")
        save_png(ref_image, ref_path, quantize="round")
        save_png(ref_mask, ref_mask_path, quantize="round")
        report.rows.append(ManifestRow(len(report.rows), 0, os.path.abspath(target_path), os.path.abspath(ref_path),
                                       caption, os.path.abspath(ref_mask_path), f"{stem}_ref{k}"))
        added += 1
    return added


def write_report(report: BuildReport, out_dir: str, manifest_name: str = "manifest.jsonl") -> None:
    """``<out_dir>/<manifest_name>`` (the rows) and ``<out_dir>/skipped.txt`` (name<TAB>reason a line)."""
    os.makedirs(out_dir, exist_ok=True)
    write_manifest(report.rows, os.path.join(out_dir, manifest_name))
    with open(os.path.join(out_dir, "skipped.txt"), "w", encoding="utf-8") as handle:
        handle.write("".join(f"{name}\t{reason}\n" for name, reason in report.skipped))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamcache_core.training.dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of photos (captions as <stem>.txt beside them or --captions)")
    parser.add_argument("--out", help="output folder (manifest.jsonl, references/, skipped.txt)")
    parser.add_argument("--captions", help="CSV with columns file (or image) and caption")
    parser.add_argument("--sam", help="SAM checkpoint (sam_vit_b/l/h) for images without a mask beside them")
    parser.add_argument("--sam-device", default="cpu")
    parser.add_argument("--mask-suffix", default="_mask", help="mask files are <stem><suffix>.png (default _mask)")
    parser.add_argument("--references-per-image", type=int, default=1, help="augmented references per photo")
    parser.add_argument("--reference-size", type=int, default=512)
    parser.add_argument("--margin", type=float, default=0.1, help="free space around the subject (fraction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest-name", default="manifest.jsonl")
    parser.add_argument("--validate", metavar="MANIFEST", help="only validate an existing manifest and report")
    args = parser.parse_args(argv)
    if not args.validate and (not args.images or not args.out):
        parser.error("--images and --out are required (or --validate MANIFEST)")
    try:
        if args.validate:
            manifest = read_manifest(args.validate)
            print(manifest.report())
            return 0 if manifest.rows else 1
        if args.sam:  # a path, or a name in ComfyUI's models/sams

            args.sam = resolve_model_file(args.sam, "sam")
        segmenter = SamSegmenter(args.sam, args.sam_device) if args.sam else None
        report = build_dataset(args.images, args.out, args.captions, segmenter, args.mask_suffix,
                               args.references_per_image, args.reference_size, args.margin, args.seed,
                               manifest_name=args.manifest_name)
    except (ValueError, OSError) as error:  # a missing folder or file, a bad CSV: one line, not a traceback
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0 if report.rows else 1


if __name__ == "__main__":
    sys.exit(main())
