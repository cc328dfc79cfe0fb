"""The synthetic training set: captions -> renders -> text-prompted segmentation -> (caption, target, reference) rows.

    python -m dreamcache_core.training.synthesize captions --count 400000 --seed 0 --out captions.tsv
    python -m dreamcache_core.training.synthesize --captions captions.tsv --checkpoint sdxl.safetensors --out synthetic/ \\
        --detector models/grounding-dino-base --segmenter models/sam-vit-base \\
        --width 1024 --height 1024 --steps 25 --cfg 3.5 --batch 4
    torchrun --nproc_per_node 8 -m dreamcache_core.training.synthesize ...      # or --rank R --world-size W per machine
    python -m dreamcache_core.training.synthesize index synthetic/              # (re)write index.json once every shard is done
    python -m dreamcache_core.training.train --checkpoint sd15.safetensors --data synthetic/ ...

The authors' recipe (DreamCache supplementary S1): captions of concrete objects
in contexts, rendered by a strong base (SDXL, CFG 3.5, 25 steps), the subject
cut out by Grounding-DINO + SAM, references augmented.

Rows: caption row n of the captions file (``synthetic_captions``) is rendered
with seed ``--seed + n`` through ``generate``'s pipeline and sampler (ComfyUI's
Load Checkpoint, CLIP Text Encode, the stock KSampler path, VAE Decode; no
adapter), segmented by its noun (``text_segmenter``: Grounding-DINO + SAM from
transformers folders, or segment-anything's automatic prompt with ``--sam``),
filtered (``subject_filters``), and turned into augmented references by
``dataset.add_references`` (the photo builder's own code).

Output: row n lives in shard ``n // --shard-size`` (``shard-00000/`` ...):
``targets/<n>.png`` (the render; seed and caption in its PNG text),
``references/<n>_ref<k>.png`` + ``_mask.png``, ``progress.jsonl`` (one line per
finished row: seed, noun, score, mask fraction, its manifest rows or why it was
skipped), and once every row of the shard is finished ``manifest.jsonl``,
``skipped.txt`` and ``shard.json`` (kept / skipped by reason). Rank r of W
renders the shards s with s % W == r, so ranks never share a shard and the
union of their shards is the one-process result. When the last shard is
finished, ``index.json`` lists them all: the trainer reads that folder directly
(``sharded_manifest``). ``synthesis.json`` holds the settings; a rerun with
other settings into the same folder is refused.

Resuming: a rerun skips every row already in its shard's ``progress.jsonl``
whose files are valid images, and re-renders only targets that are missing or
unreadable; the result is the same as an uninterrupted run. The captions file is
streamed, never held in memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Optional

import torch

from ..comfy_bridge.pipeline import Sampler, load_pipeline
from .sharded_manifest import shard_name
from ..masking.subject_filters import EMPTY_MASK, Detection, FilterSettings, mask_fraction, rejection
from .synthetic_captions import (CaptionRow, CaptionsFileError, count_captions, read_captions, write_captions,
                                 distinct_object_count)
from ..comfy_bridge import ensure_comfyui
from ..comfy_bridge.model_files import resolve_model_file
from ..io.image_files import save_png, load_image
from ..masking.reference_mask import EmptyMaskError
from ..masking.text_segmenter import AutomaticSam, GroundedSam
from .dataset import BuildReport, add_references
from .synthesis_shards import (KEPT, PROGRESS_FILE, SETTINGS_FILE, Summary, SynthesisSettings, check_settings,
                               finish_shard, image_is_valid, missing_shards, outcome_is_intact, owns_shard,
                               rank_and_world, read_progress, read_shard_summary, row_id, row_seed, shard_of,
                               write_index_if_complete)

# --------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------

def target_path(shard_dir: str, number: int) -> str:
    return os.path.join(shard_dir, "targets", row_id(number) + ".png")


def save_target(image: torch.Tensor, path: str, row: CaptionRow, seed: int) -> None:
    save_png(image, path, {"dreamcache": {"caption": row.caption, "noun": row.noun, "seed": seed,
                                          "row": row.number}})


def row_outcome(row: CaptionRow, image: torch.Tensor, detection: Detection, shard_dir: str,
                settings: SynthesisSettings) -> dict:
    """Filter the detection and, when it is kept, write the augmented references; returns the progress record."""
    record = {"number": row.number, "id": row_id(row.number), "seed": row_seed(settings, row.number),
              "noun": row.noun, "score": detection.score,
              "mask_fraction": None if detection.mask is None else round(mask_fraction(detection.mask), 6)}
    rejected = rejection(detection, settings.filters)
    if rejected is not None:
        return {**record, "status": "skipped", "reason": rejected.reason, "detail": rejected.detail}
    report = BuildReport()
    path = target_path(shard_dir, row.number)
    try:
        add_references(report, path, image, detection.mask, row.caption, os.path.join(shard_dir, "references"),
                       settings.references_per_image, settings.reference_size, settings.margin, settings.seed)
    except EmptyMaskError:
        return {**record, "status": "skipped", "reason": EMPTY_MASK, "detail": "no subject left to cut out"}
    if not report.rows:
        return {**record, "status": "skipped", "reason": "subject left the frame",
                "detail": "every augmented reference lost the subject"}
    rows = [row_json.to_json(shard_dir) for row_json in report.rows]
    return {**record, "status": KEPT, "rows": rows, "skipped_references": report.skipped}


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

class ShardState:
    """The shard being worked on: its folder, the outcomes already on disk, its progress log."""

    def __init__(self, out_dir: str, shard: int, settings: SynthesisSettings, total: int):
        self.shard = shard
        self.dir = os.path.join(out_dir, shard_name(shard))
        self.numbers = range(shard * settings.shard_size, min(total, (shard + 1) * settings.shard_size))
        os.makedirs(self.dir, exist_ok=True)
        self.outcomes = {n: o for n, o in read_progress(self.dir).items() if outcome_is_intact(o, self.dir)}
        self.log = open(os.path.join(self.dir, PROGRESS_FILE), "a", encoding="utf-8")

    def record(self, outcome: dict) -> None:
        self.outcomes[outcome["number"]] = outcome
        self.log.write(json.dumps(outcome) + "\n")  # key order kept: rows read back are written alike
        self.log.flush()

    def complete(self) -> bool:
        return all(n in self.outcomes for n in self.numbers)

    def close(self) -> None:
        self.log.close()


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="row", desc="synthesize", dynamic_ncols=True)


def synthesize(captions_path: str, out_dir: str, render: Callable, segment: Callable,
               settings: SynthesisSettings = SynthesisSettings(), rank: int = 0, world: int = 1, batch: int = 1,
               limit: Optional[int] = None, progress: bool = False, log: Callable[[str], None] = print) -> Summary:
    """Synthesize this rank's shards of ``captions_path`` into ``out_dir``; see the module docstring.

    ``render(captions, seeds)`` -> images [B, H, W, 3] in 0..1 (``PipelineRenderer``); ``segment(image, noun)``
    -> ``Detection`` (``text_segmenter``). ``limit`` stops after that many rows were newly finished (a partial run;
    rerun to continue). Batches never cross a shard and fill fixed slots of ``batch`` rows, so a shard is rendered
    in the same batches by one process or many.
    """
    rank, world = rank_and_world(rank, world)
    if batch < 1:
        raise ValueError(f"--batch must be at least 1 (got {batch}).")
    total = count_captions(captions_path)
    if total == 0:
        raise ValueError(f"{captions_path} holds no caption rows (one 'caption<TAB>subject noun' a line).")
    check_settings(out_dir, settings, captions_path, total)
    mine = [s for s in range(math.ceil(total / settings.shard_size)) if owns_shard(s, rank, world)]
    my_rows = sum(len(range(s * settings.shard_size, min(total, (s + 1) * settings.shard_size))) for s in mine)
    summary = Summary()
    finished_before = {s: read_shard_summary(os.path.join(out_dir, shard_name(s))) for s in mine}
    done_rows = 0
    for shard, shard_summary in finished_before.items():
        if shard_summary is not None:
            done_rows += shard_summary["stop"] - shard_summary["first"]
    bar = progress_bar(my_rows, done_rows, progress)
    state: Optional[ShardState] = None
    pending: list = []
    new_rows = 0

    def flush():
        nonlocal new_rows
        if not pending:
            return

        missing = [row for row in pending if not image_is_valid(target_path(state.dir, row.number))]
        if missing:
            seeds = [row_seed(settings, row.number) for row in missing]
            rendered = render([row.caption for row in missing], seeds)
            for row, image, seed in zip(missing, rendered, seeds):
                save_target(image, target_path(state.dir, row.number), row, seed)
            summary.rendered += len(missing)
        # segment and cut from the saved file (what the trainer reads), so a resumed row is the same
        images = [load_image(target_path(state.dir, row.number), transparency="white") for row in pending]
        for row, image in zip(pending, images):
            outcome = row_outcome(row, image, segment(image, row.noun), state.dir, settings)
            state.record(outcome)
            summary.add(outcome)
            new_rows += 1
        pending.clear()
        if bar is not None:
            bar.update(len(images))
            bar.set_postfix(kept=summary.kept, skipped=sum(summary.skipped.values()))

    def close_shard():
        nonlocal state
        flush()
        if state is None:
            return
        if state.complete():
            finish_shard(state.dir, state.outcomes, state.numbers)
            summary.shards_finished.append(shard_name(state.shard))
        state.close()
        state = None

    try:
        for row in read_captions(captions_path):
            shard = shard_of(row.number, settings.shard_size)
            if not owns_shard(shard, rank, world) or finished_before.get(shard) is not None:
                continue
            if state is None or state.shard != shard:
                close_shard()
                state = ShardState(out_dir, shard, settings, total)
            if row.number in state.outcomes:
                summary.resumed += 1
                if bar is not None:
                    bar.update(1)
                continue
            if limit is not None and new_rows + len(pending) >= limit:
                break
            slot = (row.number - state.numbers.start) // batch
            if pending and (pending[0].number - state.numbers.start) // batch != slot:
                flush()
            pending.append(row)
        close_shard()
    finally:
        if state is not None:
            state.close()
        if bar is not None:
            bar.close()
    summary.index = write_index_if_complete(out_dir, total, settings.shard_size)
    log(f"rank {rank}/{world}: " + summary.text())
    return summary


# --------------------------------------------------------------------------
# Rendering through generate's pipeline
# --------------------------------------------------------------------------

def batched_conditioning(conditionings: list):
    """One CONDITIONING holding B single-prompt ones along the batch axis; None when their shapes differ
    (prompts longer than one CLIP chunk), and they are then sampled one by one."""
    firsts = [c[0] for c in conditionings]
    if any(len(c) != 1 for c in conditionings) or len({tuple(f[0].shape) for f in firsts}) != 1:
        return None
    options = {}
    for key in firsts[0][1]:
        values = [f[1].get(key) for f in firsts]
        if all(isinstance(v, torch.Tensor) for v in values):
            if len({tuple(v.shape) for v in values}) != 1:
                return None
            options[key] = torch.cat(values)
        elif all(v == values[0] for v in values):
            options[key] = values[0]
        else:
            return None
    return [[torch.cat([f[0] for f in firsts]), options]]


class PipelineRenderer:
    """Renders captions with generation's Pipeline and Sampler (``comfy_bridge.pipeline``; guidance off: the plain
    base model)."""

    def __init__(self, pipeline, width: int = 1024, height: int = 1024, steps: int = 25, cfg: float = 3.5,
                 sampler: str = "euler", scheduler: str = "normal", negative: str = ""):
        for name, value in (("width", width), ("height", height)):
            if value % 8 or value < 64:
                raise ValueError(f"--{name} must be a multiple of 8, at least 64 (got {value}).")
        self.pipeline = pipeline
        self.settings = {"guidance": "off", "strength": 1.0, "steps": int(steps), "cfg": float(cfg),
                         "text_cfg": float(cfg), "sampler": sampler, "scheduler": scheduler}
        self.latent_shape = (4, height // 8, width // 8)
        self.negative_text = negative
        self.sampler = Sampler(pipeline.model, None, None, self.settings)
        self._negative = None

    def describe(self) -> dict:
        return {**{k: v for k, v in self.settings.items() if k not in ("guidance", "strength", "text_cfg")},
                "width": self.latent_shape[2] * 8, "height": self.latent_shape[1] * 8, "negative": self.negative_text}

    def __call__(self, captions: list, seeds: list) -> torch.Tensor:
        with torch.inference_mode():
            if self._negative is None:
                self._negative = self.pipeline.encode_text(self.negative_text)
            positives = [self.pipeline.encode_text(caption) for caption in captions]
            positive = batched_conditioning(positives)
            if positive is None:
                samples = torch.cat([self.sampler.sample(p, self._negative, [s], self.latent_shape)
                                     for p, s in zip(positives, seeds)])
            else:
                samples = self.sampler.sample(positive, self._negative, list(seeds), self.latent_shape)
            images = self.pipeline.decode(samples)
        return images[..., :3].clone()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def add_segmentation_arguments(p: argparse.ArgumentParser) -> None:
    """The segmentation options (what ``make_segmenter`` reads) shared by synthesis and Subjects200K preparation."""
    g = p.add_argument_group("segmentation")
    g.add_argument("--detector", help="Grounding-DINO folder (transformers save_pretrained / a local hub copy)")
    g.add_argument("--segmenter", help="SAM folder for transformers' SamModel (with --detector)")
    g.add_argument("--sam", help="without --detector: a segment-anything checkpoint, prompted automatically")
    g.add_argument("--device", help="device of the segmentation models (default: cuda when available)")
    g.add_argument("--min-score", type=float, default=FilterSettings.min_score, help="lowest detection score kept")
    g.add_argument("--min-mask-fraction", type=float, default=FilterSettings.min_fraction)
    g.add_argument("--max-mask-fraction", type=float, default=FilterSettings.max_fraction)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.training.synthesize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="captions file: caption<TAB>subject noun a line")
    p.add_argument("--out", required=True, help="output folder (shards, index.json, synthesis.json)")
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or the custom_nodes parent)")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("rendering (the authors: SDXL, CFG 3.5, 25 steps)")
    g.add_argument("--checkpoint", help="the base that renders the targets (what Load Checkpoint reads)")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--cfg", type=float, default=3.5)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--scheduler", default="normal")
    g.add_argument("--negative", default="")
    g.add_argument("--seed", type=int, default=0, help="row n renders with seed + n")
    g.add_argument("--batch", type=int, default=1, help="rows rendered together")
    add_segmentation_arguments(p)
    g = p.add_argument_group("references and output")
    g.add_argument("--references-per-image", type=int, default=1)
    g.add_argument("--reference-size", type=int, default=512)
    g.add_argument("--margin", type=float, default=0.1)
    g.add_argument("--shard-size", type=int, default=1000, help="caption rows per shard folder")
    g.add_argument("--rank", type=int, help="this process's rank (default: $RANK, else 0)")
    g.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE, else 1)")
    g.add_argument("--limit", type=int, help="stop after this many newly finished rows (rerun to continue)")
    return p


def make_segmenter(args):
    if args.detector:
        if not args.segmenter:
            raise ValueError("--detector needs --segmenter, the transformers SAM folder that cuts the detected box out.")
        return GroundedSam(args.detector, args.segmenter, args.device), {
            "kind": "grounding-dino+sam", "detector": os.path.abspath(args.detector),
            "segmenter": os.path.abspath(args.segmenter)}
    if args.segmenter:
        raise ValueError("--segmenter is prompted by the detector's boxes: give --detector too, or --sam alone.")
    if args.sam:
        args.sam = resolve_model_file(args.sam, "sam", args.comfyui)
        return AutomaticSam(args.sam, args.device), {"kind": "segment-anything automatic prompt",
                                                     "sam": os.path.abspath(args.sam)}
    raise ValueError("Give the segmentation models: --detector DIR --segmenter DIR (Grounding-DINO + SAM), "
                     "or --sam FILE (segment-anything, automatic prompt).")


def run_synthesis(argv: list, pipeline=None, segmenter=None, log: Optional[Callable] = None) -> Summary:
    """The main command; tests pass a ``pipeline`` (comfy_bridge.pipeline.Pipeline) and/or a ``segmenter`` instead of files."""
    args = build_parser().parse_args(argv)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if not os.path.isfile(args.captions):
        raise ValueError(f"--captions {args.captions} is not a file; write one with "
                         "`python -m dreamcache_core.training.synthesize captions --count N --out captions.tsv`.")
    segmenter_info = {"kind": "given by the caller"}
    if segmenter is None:
        segmenter, segmenter_info = make_segmenter(args)
    checkpoint_info = None
    if pipeline is None:
        if not args.checkpoint:
            raise ValueError("Give the base that renders the targets: --checkpoint FILE (SDXL, SD1.5, ...).")
        ensure_comfyui(args.comfyui, cpu=args.cpu)

        args.checkpoint = resolve_model_file(args.checkpoint, "checkpoint", args.comfyui)
        checkpoint_info = os.path.abspath(args.checkpoint)
        pipeline = load_pipeline(args.checkpoint)
    renderer = PipelineRenderer(pipeline, args.width, args.height, args.steps, args.cfg, args.sampler, args.scheduler,
                                args.negative)
    settings = SynthesisSettings(
        seed=args.seed, shard_size=args.shard_size, references_per_image=args.references_per_image,
        reference_size=args.reference_size, margin=args.margin,
        filters=FilterSettings(args.min_score, args.min_mask_fraction, args.max_mask_fraction),
        render={**renderer.describe(), "checkpoint": checkpoint_info}, segmenter=segmenter_info)
    rank, world = rank_and_world(args.rank, args.world_size)
    return synthesize(args.captions, args.out, renderer, segmenter, settings, rank, world, args.batch, args.limit,
                      progress=not args.quiet, log=log)


def captions_command(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.training.synthesize captions",
                                description="Write a captions file of generated object-in-context captions.")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    write_captions(args.out, args.count, args.seed)
    print(f"wrote {args.count} captions to {args.out} (from {distinct_object_count():,} distinct objects)")
    return 0


def index_command(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.training.synthesize index",
                                description="Write index.json of a synthesis folder whose shards are all finished.")
    p.add_argument("out")
    args = p.parse_args(argv)
    path = os.path.join(args.out, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{args.out} holds no {SETTINGS_FILE}: it is not a synthesis folder.")
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    total, shard_size = record["captions"]["rows"], record["settings"]["shard_size"]
    index = write_index_if_complete(args.out, total, shard_size)
    if index is None:
        missing = missing_shards(args.out, total, shard_size)
        raise ValueError(f"{len(missing)} shard(s) are not finished ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); run the synthesis for their ranks again.")
    print(f"wrote {index}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["captions"]:
        return captions_command(argv[1:])
    if argv[:1] == ["index"]:
        return index_command(argv[1:])
    summary = run_synthesis(argv)
    return 0 if summary.kept or summary.resumed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, CaptionsFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
