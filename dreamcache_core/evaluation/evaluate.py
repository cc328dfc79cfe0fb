"""DreamBench scores of a generation folder: DINO, CLIP-I, CLIP-T and the masked MDINO, MCLIP-I.

    python -m dreamcache_core.evaluation.evaluate --generations dreambench_out/ --dino models/dino-vits16 \\
        --clip models/clip-vit-base-patch32 [--sam sam_vit_b_01ec64.pth] [--json scores.json]

``--generations`` is a folder written by ``python -m dreamcache_core.evaluation.generate`` (its settings.json says which
subject, prompt and reference each image has), or any folder in the DreamBench layout
``<subject>/<prompt index>_<n>.png`` (images of another method; prompts are then the shipped DreamBench
prompts, and ``--dataset`` must give the real images).

Image similarity (DINO, CLIP-I) is measured against the real images of the subject (``--against real``, the
DreamBench protocol; the dreambooth ``dataset`` folder, from settings.json or ``--dataset``) or against the
one reference image (``--against reference``); the default, ``auto``, takes the real images wherever they are
known. The masked variants segment the subject in both images (SAM
with the automatic central-subject prompt, or a ``<image stem>_mask.png`` file beside an image) and put it on
white. The DINO model is a ViT-S/16 (``facebook/dino-vits16``), CLIP a ViT-B/32
(``openai/clip-vit-base-patch32``), both as local transformers folders; see ``metrics`` for the exact
definitions (CLIP-T is the plain cosine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Optional

import torch

from . import metrics
from ..io.image_files import list_images, load_image, load_mask
from ..masking.sam_segmenter import SamSegmenter
from .generate import SETTINGS_FILE, SETTINGS_FORMAT
from ..comfy_bridge.model_files import resolve_model_file
from ..data import dreambench_prompts, dreambench_subject

FILE_PATTERN = re.compile(r"^(\d+)_(\d+)\.(png|jpg|jpeg|webp)$", re.IGNORECASE)


def read_generations(folder: str, dataset: Optional[str] = None, unique_token: str = "") -> dict:
    """{'images': [{file (absolute), subject, prompt}], 'references': {subject: {...}}} of a generation folder."""
    settings_path = os.path.join(folder, SETTINGS_FILE)
    if os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"{settings_path} was not written by dreamcache_core.evaluation.generate.")
        images = [dict(item, file=os.path.join(folder, item["file"])) for item in record["images"]]
        references = {}
        for ref in record.get("references", []):
            name = ref.get("subject") or ""
            real = list(ref.get("real_images") or [])
            if dataset and name:
                real = list_images(os.path.join(dataset, name))
            reference_image = (ref.get("reference_image") or {}).get("path")
            references[name] = {"real_images": real, "reference_image": reference_image}
        return {"images": images, "references": references, "settings": record.get("settings", {})}

    if not dataset:
        raise ValueError(f"{folder} has no settings.json; for a folder in the DreamBench layout "
                         "(<subject>/<prompt index>_<n>.png) give --dataset (the dreambooth 'dataset' folder).")
    images, references = [], {}
    for name in sorted(os.listdir(folder)):
        subfolder = os.path.join(folder, name)
        if not os.path.isdir(subfolder):
            continue
        subject = dreambench_subject(name)
        prompts = dreambench_prompts(subject, unique_token)
        for file in sorted(os.listdir(subfolder)):
            match = FILE_PATTERN.match(file)
            if not match:
                continue
            index = int(match.group(1))
            if index >= len(prompts):
                raise ValueError(f"{os.path.join(subfolder, file)}: prompt index {index} is not one of the 25 prompts.")
            images.append({"file": os.path.join(subfolder, file), "subject": name, "prompt": prompts[index],
                           "prompt_index": index})
        real = list_images(os.path.join(dataset, name))
        references[name] = {"real_images": real, "reference_image": real[0] if real else None}
    if not images:
        raise ValueError(f"No images named <prompt index>_<n>.png under the subject folders of {folder}.")
    return {"images": images, "references": references, "settings": {}}


def sibling_mask(path: str) -> Optional[str]:
    stem = os.path.splitext(path)[0]
    candidate = stem + "_mask.png"
    return candidate if os.path.isfile(candidate) else None


class MaskSource:
    """Subject masks: a <stem>_mask.png beside an image first, else SAM, else None."""

    def __init__(self, segmenter: Optional[Callable] = None):
        self.segmenter = segmenter

    def __call__(self, path: str, image: torch.Tensor) -> Optional[torch.Tensor]:
        found = sibling_mask(path)
        if found:
            return load_mask(found)
        if self.segmenter is not None:
            return self.segmenter(image[0])
        return None


def evaluate(generations: dict, dino=None, clip=None, against: str = "auto", masks: Optional[MaskSource] = None,
             log: Callable[[str], None] = print) -> dict:
    """Score every image of ``generations`` (see ``read_generations``); returns per-image records and aggregates."""
    by_subject: dict = {}
    for item in generations["images"]:
        by_subject.setdefault(item.get("subject") or "", []).append(item)
    records = []
    notes = []
    for subject, items in by_subject.items():
        ref = generations["references"].get(subject, {})
        mode = against
        if mode == "auto":
            mode = "real" if ref.get("real_images") else "reference"
        if mode == "real":
            real_paths = ref.get("real_images") or []
            if not real_paths:
                raise ValueError(f"No real images known for subject '{subject or '(unnamed)'}': give --dataset, or "
                                 "use --against reference.")
        else:
            if not ref.get("reference_image"):
                raise ValueError(f"No reference image recorded for subject '{subject or '(unnamed)'}' (a run from a "
                                 "saved cache): use --against real with --dataset.")
            real_paths = [ref["reference_image"]]
        generated = [load_image(item["file"])[None] for item in items]
        real = [load_image(path)[None] for path in real_paths]
        generated_masks = real_masks = None
        if masks is not None:
            generated_masks = [masks(item["file"], image) for item, image in zip(items, generated)]
            real_masks = [masks(path, image) for path, image in zip(real_paths, real)]
            if any(m is None for m in generated_masks + real_masks):
                generated_masks = real_masks = None
                notes.append(f"{subject or '(all)'}: masked metrics skipped (no mask for every image: give --sam)")
        scores = metrics.score_subject(
            [image[0, ..., :3] for image in generated], [item["prompt"] for item in items],
            [image[0, ..., :3] for image in real], dino=dino, clip=clip,
            generated_masks=generated_masks, real_masks=real_masks)
        for item, score in zip(items, scores):
            records.append({"file": item["file"], "subject": subject, "prompt": item["prompt"], "against": mode,
                            **score})
        means = {k: sum(s[k] for s in scores) / len(scores) for k in (scores[0] if scores else {})}
        log(f"{subject or '(all)'}: {len(items)} images, " +
            ", ".join(f"{metrics.METRIC_LABELS[k]} {v:.3f}" for k, v in means.items()))
    present = [m for m in metrics.METRIC_NAMES if any(m in r for r in records)]
    used = sorted({r["against"] for r in records})
    return {"against": used[0] if len(used) == 1 else "mixed", "records": records, "notes": notes, "metrics": present,
            **metrics.aggregate(records, present)}


def format_table(result: dict, paper_bases=("sd15", "sd21")) -> str:
    names = result["metrics"]
    header = "| subject | images | " + " | ".join(metrics.METRIC_LABELS[m] for m in names) + " |"
    lines = [header, "|---|---|" + "---|" * len(names)]

    def cell(summary):
        return "" if not summary or summary.get("mean") is None else f"{summary['mean']:.3f}"

    for subject, values in sorted(result["subjects"].items()):
        lines.append(f"| {subject or '(all)'} | {values['images']} | " +
                     " | ".join(cell(values[m]) for m in names) + " |")
    overall = result["overall"]
    lines.append(f"| **overall (ours)** | {overall['images']} | " +
                 " | ".join(f"**{cell(overall[m])}**" for m in names) + " |")
    for base in paper_bases:
        paper = dict(metrics.PAPER_NUMBERS[base])
        paper.update(metrics.PAPER_NUMBERS["masked"])
        label = {"sd15": "SD1.5", "sd21": "SD2.1"}[base]
        masked_note = " (masked: as published)"
        lines.append(f"| paper, DreamCache {label}{masked_note if any(m in names for m in ('mdino', 'mclip_i')) else ''} "
                     "| | " + " | ".join("" if m not in paper else f"{paper[m]:.3f}" for m in names) + " |")
    lines.append("")
    target = {"real": "the real images of each subject", "reference": "the reference image"}.get(
        result["against"], "the real images where known, else the reference")
    lines.append(f"Image similarity against {target}"
                 "; overall = mean over images. CLIP-T = plain cosine of CLIP ViT-B/32 image and prompt embeddings. "
                 "The paper's masked numbers (MDINO 0.837, MCLIP-I 0.906) do not name their base model.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.evaluation.evaluate",
                                description="DreamBench metrics (DINO, CLIP-I, CLIP-T, MDINO, MCLIP-I) of a "
                                            "generation folder, from local model folders (nothing downloads).")
    p.add_argument("--generations", required=True, help="folder written by dreamcache_core.evaluation.generate, or a "
                                                        "DreamBench-layout folder <subject>/<prompt>_<n>.png")
    p.add_argument("--dino", help="local folder of DINO ViT-S/16 in transformers format (facebook/dino-vits16)")
    p.add_argument("--clip", help="local folder of CLIP ViT-B/32 in transformers format (openai/clip-vit-base-patch32)")
    p.add_argument("--dataset", help="the dreambooth 'dataset' folder (real images); default: the one generate used")
    p.add_argument("--against", default="auto", choices=["auto", "real", "reference"],
                   help="real: every real image of the subject (DreamBench); reference: the one reference image; "
                        "auto (default): real where the real images are known, else the reference")
    p.add_argument("--sam", help="SAM checkpoint for the masked metrics (else only <stem>_mask.png files are used)")
    p.add_argument("--no-masked", action="store_true", help="skip MDINO / MCLIP-I")
    p.add_argument("--unique-token", default="", help="for DreamBench-layout folders: the token before the class")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", help="write per-image scores and the aggregates here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.dino and not args.clip:
        p.error("give --dino and/or --clip (local model folders)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    generations = read_generations(args.generations, args.dataset, args.unique_token)
    dino = metrics.DinoEmbedder(args.dino, device) if args.dino else None
    clip = metrics.ClipEmbedder(args.clip, device) if args.clip else None
    masks = None
    if not args.no_masked:
        segmenter = None
        if args.sam:
            args.sam = resolve_model_file(args.sam, "sam")
            segmenter = SamSegmenter(args.sam, device)
        masks = MaskSource(segmenter)
    result = evaluate(generations, dino, clip, args.against, masks, log)
    result["models"] = {"dino": args.dino, "clip": args.clip, "sam": args.sam}
    print(format_table(result))
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
