"""What ``train --data PATH`` points at, told apart from the path itself (plain python).

* ``manifest``: a JSONL manifest file (``training_manifest``);
* ``sharded``: a folder (or its index.json) written by ``synthesize`` (``sharded_manifest``);
* ``store``: a folder written by ``train --precompute`` (``store.json``);
* ``authors``: the authors' released layout, object folders of ``<stem>_generation.png`` / ``_caption.txt`` /
  ``_mask.png`` (``authors_layout``);
* ``subjects200k``: a folder written by ``prepare_subjects200k`` (a sharded folder whose index names the source).
  A folder of Subjects200K's raw parquet files is recognised too, and answered with the preparation command:
  the set has no masks, and the references must be cut out once before training.

``--augment`` defaults to ``authors`` for the ``authors`` and ``subjects200k`` sources (as the authors trained)
and to ``none`` for the others (their references are used as they are, as before).
"""
from __future__ import annotations

import json
import os

from .authors_layout import is_authors_layout, AuthorsLayout
from .sharded_manifest import INDEX_FILE, is_sharded, ShardedManifest
from .precomputed_store import PrecomputedStore
from .training_manifest import read_manifest

DATA_FORMATS = ("auto", "manifest", "sharded", "store", "authors", "subjects200k")
AUGMENTED_BY_DEFAULT = ("authors", "subjects200k")
PARQUET_SEARCH_DEPTH = 2  # folders below --data searched for parquet files when telling formats apart


def sharded_index(path: str) -> dict:
    """The index.json of a sharded folder (or the file itself) as a dict; {} when there is none."""
    if not is_sharded(path):
        return {}
    index = os.path.join(path, INDEX_FILE) if os.path.isdir(path) else path
    with open(index, encoding="utf-8") as handle:
        return json.load(handle)


def holds_parquet(path: str, depth: int = PARQUET_SEARCH_DEPTH) -> bool:
    """True when ``path`` or a folder at most ``depth`` levels below it holds a ``*.parquet`` file."""
    if not os.path.isdir(path):
        return False
    try:
        with os.scandir(path) as entries:
            entries = list(entries)
    except OSError:
        return False
    if any(entry.is_file() and entry.name.endswith(".parquet") for entry in entries):
        return True
    return depth > 0 and any(holds_parquet(entry.path, depth - 1) for entry in entries
                             if entry.is_dir() and not entry.name.startswith("."))


def detect_data_format(path: str) -> str:
    """One of DATA_FORMATS (not ``auto``) for ``path``, or a ValueError saying what --data can be."""
    index = sharded_index(path)
    if index:
        return "subjects200k" if index.get("source") == "subjects200k" else "sharded"
    if os.path.isdir(path):
        if PrecomputedStore.is_store(path):
            return "store"
        if is_authors_layout(path):
            return "authors"
        if holds_parquet(path):
            return "subjects200k"
        raise ValueError(f"--data {path} is a folder, but none this trainer reads: not a precomputed store "
                         "(store.json), a sharded folder (index.json), an authors'-layout folder (object folders "
                         "holding <stem>_generation.png, _caption.txt, _mask.png) or Subjects200K's parquet files.")
    if os.path.isfile(path):
        return "manifest"
    raise ValueError(f"--data {path} does not exist; give a manifest .jsonl, a sharded or precomputed folder, an "
                     "authors'-layout folder or a folder prepared by prepare_subjects200k.")


def raw_subjects200k_error(path: str) -> ValueError:
    return ValueError(
        f"--data {path} holds Subjects200K's raw parquet files, which have no subject masks. Cut the references "
        "out once, then train from that folder:\n"
        f"  python -m dreamcache_core.training.prepare_subjects200k --parquet {path} --out PREPARED "
        "--detector GROUNDING_DINO_DIR --segmenter SAM_DIR   (or --sam sam_vit_b_01ec64.pth) [--min-quality 5]\n"
        "  python -m dreamcache_core.training.train ... --data PREPARED")


def open_manifest(path: str, data_format: str, min_quality=None, log=print):
    """The manifest-like object (``rows``, ``skipped``, ``report()``) of a non-store ``path`` of ``data_format``."""
    if data_format == "manifest":
        return read_manifest(path)
    if data_format == "authors":
        return AuthorsLayout(path, log)
    if data_format in ("sharded", "subjects200k"):
        index = sharded_index(path)
        if not index:
            if data_format == "subjects200k" and holds_parquet(path):
                raise raw_subjects200k_error(path)
            raise ValueError(f"--data {path} holds no finished sharded index.json; finish its preparation (every "
                             "rank), or pass the right --data-format.")
        if data_format == "subjects200k" and min_quality is not None:
            prepared = index.get("min_quality")
            if prepared is None or float(min_quality) > float(prepared):
                raise ValueError(f"--min-quality {min_quality} asks for better rows than {path} was prepared with "
                                 f"({prepared}); its rows carry no scores to filter by. Prepare a folder with "
                                 f"prepare_subjects200k --min-quality {min_quality}.")
        return ShardedManifest(path)
    raise ValueError(f"Unknown --data-format {data_format!r}; use one of {', '.join(DATA_FORMATS)}.")
