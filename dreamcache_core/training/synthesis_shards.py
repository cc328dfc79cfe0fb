"""A synthesis run's bookkeeping: its settings and summary, which rank owns which shard, and the files of a shard
(progress lines, the shard summary, the index written once every shard is done, the settings record a rerun
must match). Plain Python and torch; the run itself is ``synthesize``."""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional


from ..io.file_hashes import file_sha256
from .sharded_manifest import SHARD_MANIFEST, shard_name, write_index
from ..masking.subject_filters import REASONS, FilterSettings
from ..io.image_files import check_image_file
from .dataset import BuildReport, write_report


SETTINGS_FILE = "synthesis.json"
SETTINGS_FORMAT = "dreamcache-synthesis"
PROGRESS_FILE = "progress.jsonl"
SHARD_SUMMARY = "shard.json"
KEPT = "kept"


@dataclass(frozen=True)
class SynthesisSettings:
    """What decides the rows (a rerun into the same folder must use the same)."""

    seed: int = 0
    shard_size: int = 1000
    references_per_image: int = 1
    reference_size: int = 512
    margin: float = 0.1
    filters: FilterSettings = FilterSettings()
    render: dict = field(default_factory=dict)     # the renderer's settings (checkpoint, size, steps, cfg, ...)
    segmenter: dict = field(default_factory=dict)  # which segmenter (recorded)

    def __post_init__(self):
        if self.shard_size < 1 or self.references_per_image < 1 or self.reference_size < 8:
            raise ValueError("--shard-size and --references-per-image must be at least 1, --reference-size at least 8.")


@dataclass
class Summary:
    """Counts of one run of one rank (and, once all shards are done, of the whole set)."""

    kept: int = 0           # images kept
    rows: int = 0           # manifest rows written (kept x references that stayed in frame)
    skipped: Counter = field(default_factory=Counter)  # reason -> images
    rendered: int = 0       # targets rendered by this run (the rest were already on disk)
    resumed: int = 0        # rows already finished by an earlier run
    shards_finished: list = field(default_factory=list)
    index: Optional[str] = None

    def add(self, outcome: dict) -> None:
        if outcome["status"] == KEPT:
            self.kept += 1
            self.rows += len(outcome["rows"])
        else:
            self.skipped[outcome["reason"]] += 1

    def text(self) -> str:
        skipped = ", ".join(f"{reason} {self.skipped[reason]}" for reason in REASONS if self.skipped[reason])
        extra = sorted(set(self.skipped) - set(REASONS))
        skipped += "".join(f", {reason} {self.skipped[reason]}" for reason in extra)
        line = (f"{self.kept} images kept ({self.rows} manifest rows), {sum(self.skipped.values())} skipped"
                + (f" ({skipped})" if skipped else "")
                + f"; {self.rendered} rendered now, {self.resumed} done by an earlier run")
        if self.index:
            line += f"; index {self.index}"
        return line


# --------------------------------------------------------------------------
# Ranks and shards
# --------------------------------------------------------------------------

def rank_and_world(rank: Optional[int] = None, world: Optional[int] = None) -> tuple:
    """(rank, world size): the explicit values, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"The rank must lie in 0..world size - 1 (got rank {rank} of world size {world}).")
    return rank, world


def shard_of(number: int, shard_size: int) -> int:
    return number // shard_size


def owns_shard(shard: int, rank: int, world: int) -> bool:
    return shard % world == rank


def row_id(number: int) -> str:
    return f"{number:08d}"


def row_seed(settings: SynthesisSettings, number: int) -> int:
    return settings.seed + number


# --------------------------------------------------------------------------
# Files of a shard
# --------------------------------------------------------------------------

def image_is_valid(path: str) -> bool:
    return check_image_file(path, "image") is None


def read_progress(shard_dir: str) -> dict:
    """row number -> outcome, from a shard's progress.jsonl (a torn last line, from a crash, is ignored)."""
    outcomes = {}
    path = os.path.join(shard_dir, PROGRESS_FILE)
    if not os.path.isfile(path):
        return outcomes
    with open(path, encoding="utf-8") as handle:
        for text in handle:
            try:
                outcome = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(outcome, dict) and "number" in outcome and "status" in outcome:
                outcomes[int(outcome["number"])] = outcome
    return outcomes


def outcome_is_intact(outcome: dict, shard_dir: str) -> bool:
    """A finished row still counts when every image file it points to is a readable image."""
    if outcome["status"] != KEPT:
        return True
    paths = [os.path.join(shard_dir, row[key]) for row in outcome["rows"] for key in ("target", "reference",
                                                                                        "reference_mask")]
    return bool(outcome["rows"]) and all(image_is_valid(path) for path in paths)


def finish_shard(shard_dir: str, outcomes: dict, numbers: range) -> dict:
    """Write the shard's manifest.jsonl, skipped.txt and shard.json from its outcomes (in row order)."""
    report = BuildReport()
    counts = Counter()
    for number in numbers:
        outcome = outcomes[number]
        if outcome["status"] == KEPT:
            report.rows.extend(outcome["rows"])
            counts[KEPT] += 1
        else:
            report.skipped.append((row_id(number), f"{outcome['reason']}: {outcome['detail']}"))
            counts[outcome["reason"]] += 1
        report.skipped.extend((name, reason) for name, reason in outcome.get("skipped_references", []))
    write_report(report, shard_dir, SHARD_MANIFEST)
    summary = {"rows": len(report.rows), "kept": counts.pop(KEPT, 0), "skipped": dict(sorted(counts.items())),
               "first": numbers.start, "stop": numbers.stop}
    with open(os.path.join(shard_dir, SHARD_SUMMARY), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1, sort_keys=True)
    return summary


def read_shard_summary(shard_dir: str) -> Optional[dict]:
    path = os.path.join(shard_dir, SHARD_SUMMARY)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(shard_dir, SHARD_MANIFEST)):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_index_if_complete(out_dir: str, total: int, shard_size: int) -> Optional[str]:
    """index.json once every shard of the set is finished (by any rank); None while some are not."""
    shards, kept, skipped = [], 0, Counter()
    for shard in range(math.ceil(total / shard_size)):
        summary = read_shard_summary(os.path.join(out_dir, shard_name(shard)))
        if summary is None:
            return None
        shards.append((shard_name(shard), summary["rows"]))
        kept += summary["kept"]
        skipped.update(summary["skipped"])
    return write_index(out_dir, shards, {"images_kept": kept, "images_skipped": dict(sorted(skipped.items())),
                                         "captions": total})


def missing_shards(out_dir: str, total: int, shard_size: int) -> list:
    return [shard_name(s) for s in range(math.ceil(total / shard_size))
            if read_shard_summary(os.path.join(out_dir, shard_name(s))) is None]


def check_settings(out_dir: str, settings: SynthesisSettings, captions_path: str, total: int) -> None:
    """Write synthesis.json, or refuse when the folder was started with other settings or captions."""
    record = {"format": SETTINGS_FORMAT, "settings": json.loads(json.dumps(asdict(settings))),
              "captions": {"rows": total, "sha256": file_sha256(captions_path)}}
    keep_run_record(out_dir, SETTINGS_FILE, record, "dreamcache_core.training.synthesize")


def keep_run_record(out_dir: str, file_name: str, record: dict, writer: str) -> None:
    """Write ``record`` (its "format", then what a rerun into ``out_dir`` must repeat) as ``out_dir/file_name``, or,
    when the folder already holds one, refuse unless it was written by ``writer`` with the same values: a resumed
    run (synthesis, Subjects200K preparation) continues only what the same settings and inputs started."""
    path = os.path.join(out_dir, file_name)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous.get("format") != record["format"]:
            raise ValueError(f"{path} was not written by {writer}; choose another --out folder.")
        for key in record:
            if previous.get(key) != record[key]:
                changed = differing_fields(previous.get(key), record[key])
                detail = f" ({', '.join(changed)} differ)" if changed else ""
                raise ValueError(f"{out_dir} was started with other {key}{detail}; resume with the same ones (see "
                                 f"{path}) or choose another --out folder.")
        return
    os.makedirs(out_dir, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def differing_fields(previous, current) -> list:
    """The field names whose values differ between two recorded objects (none to name when either is not one)."""
    previous = {} if previous is None else previous
    if not (isinstance(previous, dict) and isinstance(current, dict)):
        return []
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
