"""Turn Subjects200K's parquet files into masked references once, as a sharded manifest the trainer reads.

    python -m dreamcache_core.training.prepare_subjects200k --parquet Subjects200K/data --out s200k/ \\
        --detector models/grounding-dino-base --segmenter models/sam-vit-base [--min-quality 5]
    torchrun --nproc_per_node 4 -m dreamcache_core.training.prepare_subjects200k ...   # or --rank R --world-size W
    python -m dreamcache_core.training.train --checkpoint sd15.safetensors --data s200k/ ...

Every row (``subjects200k``) whose three quality scores are all at least ``--min-quality`` is split into its two
views; each view's subject is segmented by the row's ``item`` noun (Grounding-DINO + SAM from local
transformers folders, ``--detector``/``--segmenter``, or segment-anything's automatic prompt with ``--sam``),
filtered like the synthesis (``subject_filters``: no detection, low score, empty, tiny or whole-image mask) and
cut onto white (``reference_mask.cut_subject_on_white``, not augmented: the trainer augments it on the fly). A
row gives up to two manifest rows: reference = one view, target = the other view with its own caption.

Output, as ``synthesize`` writes it (the same shard, resume and rank code): row n of the files (numbered
across them in sorted order) lives in shard ``n // --shard-size``: ``views/<n>_<v>.png`` (targets),
``references/<n>_<v>.png`` + ``_mask.png``, ``progress.jsonl``, and once the shard is finished
``manifest.jsonl``, ``skipped.txt`` and ``shard.json``; rank r of W prepares the shards s with s % W == r. When
every shard is finished, ``index.json`` lists them (with ``"source": "subjects200k"``), and ``train --data``
reads the folder. ``prepare.json`` holds the settings; a rerun with others into the same folder is refused.
A rerun skips the rows already finished, so an interrupted run rerun gives the uninterrupted result.

Rows that cannot be used are skipped with the reason, counted in the summary and listed in each shard's
skipped.txt: an unreadable or malformed parquet row, a corrupt picture, an unexpected layout, an invalid
description, a quality under ``--min-quality``; per direction an empty caption or a failed mask.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ..masking.subject_filters import Detection, FilterSettings, mask_fraction, rejection
from .sharded_manifest import shard_name
from .subjects200k import QUALITY_KEYS, QUALITY_MAX, BadRow, decode_picture, iter_rows, split_views, survey
from .synthesis_shards import (KEPT, finish_shard, keep_run_record, owns_shard, rank_and_world, read_shard_summary,
                               row_id, shard_of, write_index_if_complete)
from .synthesize import ShardState, add_segmentation_arguments, make_segmenter
from .training_manifest import UnusableRow
from ..io.image_files import save_png
from ..masking.reference_mask import EmptyMaskError, cut_subject_on_white

SETTINGS_FILE = "prepare.json"
SETTINGS_FORMAT = "dreamcache-subjects200k-preparation"
SOURCE_NAME = "subjects200k"
LOW_QUALITY = "low quality"
INVALID_DESCRIPTION = "invalid description"
EMPTY_CAPTION = "empty caption"


@dataclass(frozen=True)
class PreparationSettings:
    """What decides the rows (a rerun into the same folder must use the same)."""

    min_quality: float = QUALITY_MAX
    shard_size: int = 1000
    reference_size: int = 512
    margin: float = 0.1
    filters: FilterSettings = FilterSettings()
    segmenter: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shard_size < 1 or self.reference_size < 8:
            raise ValueError("--shard-size must be at least 1 and --reference-size at least 8.")
        if not 0 <= self.min_quality <= QUALITY_MAX:
            raise ValueError(f"--min-quality must lie in 0..{QUALITY_MAX} (got {self.min_quality}).")


@dataclass
class PreparationSummary:
    rows: int = 0                 # manifest rows written by this run
    kept: int = 0                 # parquet rows giving at least one manifest row
    skipped: Counter = field(default_factory=Counter)     # reason -> parquet rows skipped
    directions: Counter = field(default_factory=Counter)  # reason -> single directions dropped from kept rows
    resumed: int = 0
    files_skipped: list = field(default_factory=list)     # (file, reason)
    shards_finished: list = field(default_factory=list)
    index: Optional[str] = None

    def add(self, outcome: dict) -> None:
        if outcome["status"] == KEPT:
            self.kept += 1
            self.rows += len(outcome["rows"])
            for _, reason in outcome.get("skipped_references", []):
                self.directions[reason.split(":")[0]] += 1
        else:
            self.skipped[outcome["reason"]] += 1

    def text(self) -> str:
        line = f"{self.kept} pairs kept ({self.rows} manifest rows), {sum(self.skipped.values())} skipped"
        if self.skipped:
            line += " (" + ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) + ")"
        if self.directions:
            line += "; single directions dropped: " + ", ".join(
                f"{reason} {count}" for reason, count in sorted(self.directions.items()))
        line += f"; {self.resumed} done by an earlier run"
        if self.files_skipped:
            line += "; files skipped: " + "; ".join(f"{os.path.basename(p)}: {r}" for p, r in self.files_skipped)
        if self.index:
            line += f"; index {self.index}"
        return line


# --------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------

def view_path(shard_dir: str, number: int, view: int, folder: str = "views", suffix: str = "") -> str:
    return os.path.join(shard_dir, folder, f"{row_id(number)}_{view}{suffix}.png")


def skipped(number: int, reason: str, detail: str) -> dict:
    return {"number": number, "id": row_id(number), "status": "skipped", "reason": reason, "detail": detail}


def reason_and_detail(text: str) -> tuple:
    """("corrupt image", "OSError: ...") from "corrupt image (OSError: ...)" or "corrupt image: ..."."""
    match = re.match(r"([^:(]+?)\s*(?:\((.*)\)|:\s*(.*))$", text, re.S)
    if not match:
        return text, ""
    return match.group(1), match.group(2) if match.group(2) is not None else match.group(3)


def row_outcome(row, shard_dir: str, settings: PreparationSettings, segment: Callable) -> dict:
    """Segment, filter and write one parquet row; returns its progress record (see ``synthesize``)."""
    if isinstance(row, BadRow):
        return skipped(row.number, *reason_and_detail(row.reason))
    number = row.number
    if not row.valid:
        return skipped(number, INVALID_DESCRIPTION, "description_valid is false")
    if row.min_quality() < settings.min_quality:
        scores = ", ".join(f"{k} {v}" for k, v in zip(QUALITY_KEYS, row.quality))
        return skipped(number, LOW_QUALITY, f"{scores}; --min-quality {settings.min_quality}")
    if not row.item:
        return skipped(number, "no subject noun", "description.item is empty")
    try:
        views = split_views(decode_picture(row.image_bytes))
    except UnusableRow as error:
        return skipped(number, *reason_and_detail(str(error)))
    rows, dropped = [], []
    record = {"number": number, "id": row_id(number), "item": row.item, "quality": list(row.quality),
              "collection": row.collection, "views": []}
    for view in (0, 1):
        other = 1 - view
        caption = row.descriptions[other]
        name = f"{row_id(number)} view {view} -> {other}"
        if not caption:
            dropped.append((name, f"{EMPTY_CAPTION}: description_{other} (the target's caption) is empty"))
            continue
        detection: Detection = segment(views[view], row.item)
        record["views"].append({"view": view, "score": detection.score, "mask_fraction": None if detection.mask is None
                                else round(mask_fraction(detection.mask), 6)})
        problem = rejection(detection, settings.filters)
        if problem is not None:
            dropped.append((name, f"{problem.reason}: {problem.detail}"))
            continue
        try:
            reference, mask = cut_subject_on_white(views[view], detection.mask, settings.reference_size,
                                                   settings.margin)
        except EmptyMaskError:
            dropped.append((name, "empty mask: no subject left to cut out"))
            continue
        target = view_path(shard_dir, number, other)
        if not os.path.isfile(target):
            save_png(views[other], target, quantize="round")
        save_png(reference, view_path(shard_dir, number, view, "references"), quantize="round")
        save_png(mask, view_path(shard_dir, number, view, "references", "_mask"), quantize="round")
        rows.append({"target": os.path.relpath(target, shard_dir),
                     "reference": os.path.relpath(view_path(shard_dir, number, view, "references"), shard_dir),
                     "reference_mask": os.path.relpath(view_path(shard_dir, number, view, "references", "_mask"),
                                                       shard_dir),
                     "caption": caption, "id": f"{row_id(number)}_{view}to{other}"})
    if not rows:
        reason = dropped[0][1].split(":")[0]
        return {**record, "status": "skipped", "reason": reason, "detail": "; ".join(r for _, r in dropped)}
    return {**record, "status": KEPT, "rows": rows, "skipped_references": dropped}


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

def check_settings(out_dir: str, settings: PreparationSettings, files: list) -> None:
    """Write prepare.json, or refuse when the folder was started with other settings or other files."""
    record = {"format": SETTINGS_FORMAT, "settings": json.loads(json.dumps(asdict(settings))),
              "parquet": [{"file": os.path.basename(f.path), "rows": f.rows} for f in files if not f.problem]}
    keep_run_record(out_dir, SETTINGS_FILE, record, "prepare_subjects200k")


def mark_index(index: str, settings: PreparationSettings) -> None:
    """Name the source and its quality bar in index.json (what ``train --data`` uses to pick the defaults)."""
    with open(index, encoding="utf-8") as handle:
        data = json.load(handle)
    data.update({"source": SOURCE_NAME, "min_quality": settings.min_quality,
                 "parquet_rows": data.pop("captions", None)})
    temporary = f"{index}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(temporary, index)


def prepare(parquet_dir: str, out_dir: str, segment: Callable, settings: PreparationSettings = PreparationSettings(),
            rank: int = 0, world: int = 1, limit: Optional[int] = None, progress: bool = False,
            log: Callable[[str], None] = print) -> PreparationSummary:
    """Prepare this rank's shards of the parquet files in ``parquet_dir`` into ``out_dir`` (module docstring).

    ``segment(image [H, W, 3], noun)`` -> ``Detection`` (``text_segmenter``); ``limit`` stops after that many rows
    were newly finished (a partial run; rerun to continue)."""
    rank, world = rank_and_world(rank, world)
    if not os.path.isdir(parquet_dir):
        raise ValueError(f"--parquet {parquet_dir} is not a folder; give the folder holding Subjects200K's "
                         "*.parquet files (the dataset's data/ folder).")
    files = survey(parquet_dir)
    summary = PreparationSummary(files_skipped=[(f.path, f.problem) for f in files if f.problem])
    total = sum(f.rows for f in files)
    if total == 0:
        raise ValueError(f"{parquet_dir} holds no readable parquet rows"
                         + (f" ({summary.text()})" if summary.files_skipped else "") + ".")
    check_settings(out_dir, settings, files)
    shards = math.ceil(total / settings.shard_size)
    finished_before = {s: read_shard_summary(os.path.join(out_dir, shard_name(s))) is not None
                       for s in range(shards) if owns_shard(s, rank, world)}

    def wanted(number: int) -> bool:
        return finished_before.get(shard_of(number, settings.shard_size)) is False

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(1 for s, done in finished_before.items() if not done), unit="shard", desc="prepare")
    state: Optional[ShardState] = None
    new_rows = 0

    def close_shard():
        nonlocal state
        if state is None:
            return
        if state.complete():
            finish_shard(state.dir, state.outcomes, state.numbers)
            summary.shards_finished.append(shard_name(state.shard))
            if bar is not None:
                bar.update(1)
        state.close()
        state = None

    try:
        for row in iter_rows(files, wanted):
            shard = shard_of(row.number, settings.shard_size)
            if state is None or state.shard != shard:
                close_shard()
                state = ShardState(out_dir, shard, settings, total)
            if row.number in state.outcomes:
                summary.resumed += 1
                continue
            if limit is not None and new_rows >= limit:
                break
            outcome = row_outcome(row, state.dir, settings, segment)
            state.record(outcome)
            summary.add(outcome)
            new_rows += 1
        close_shard()
    finally:
        if state is not None:
            state.close()
        if bar is not None:
            bar.close()
    summary.index = write_index_if_complete(out_dir, total, settings.shard_size)
    if summary.index:
        mark_index(summary.index, settings)
    log(f"rank {rank}/{world}: " + summary.text())
    return summary


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.training.prepare_subjects200k", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet", required=True, help="folder of Subjects200K's *.parquet files (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (shards, index.json, prepare.json)")
    p.add_argument("--min-quality", type=float, default=QUALITY_MAX,
                   help="lowest score kept, on each of the three quality scores (0-5; default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_segmentation_arguments(p)
    g = p.add_argument_group("references and output")
    g.add_argument("--reference-size", type=int, default=512)
    g.add_argument("--margin", type=float, default=0.1, help="free space around the cut-out subject (fraction)")
    g.add_argument("--shard-size", type=int, default=1000, help="parquet rows per shard folder")
    g.add_argument("--rank", type=int, help="this process's rank (default: $RANK, else 0)")
    g.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE, else 1)")
    g.add_argument("--limit", type=int, help="stop after this many newly finished rows (rerun to continue)")
    return p


def run_preparation(argv: list, segmenter=None, log: Optional[Callable] = None) -> PreparationSummary:
    """The command; tests pass a ``segmenter`` instead of model files."""
    args = build_parser().parse_args(argv)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    segmenter_info = {"kind": "given by the caller"}
    if segmenter is None:
        segmenter, segmenter_info = make_segmenter(args)
    settings = PreparationSettings(
        min_quality=args.min_quality, shard_size=args.shard_size, reference_size=args.reference_size,
        margin=args.margin, filters=FilterSettings(args.min_score, args.min_mask_fraction, args.max_mask_fraction),
        segmenter=segmenter_info)
    rank, world = rank_and_world(args.rank, args.world_size)
    return prepare(args.parquet, args.out, segmenter, settings, rank, world, args.limit, not args.quiet, log)


def main(argv=None) -> int:
    summary = run_preparation(list(sys.argv[1:] if argv is None else argv))
    return 0 if (summary.kept or summary.resumed or summary.index) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

