"""A training manifest split into shards, read lazily (plain python).

Layout (written by ``synthesize``)::

    <root>/index.json                  the shards in order, with their row counts
    <root>/shard-00000/manifest.jsonl  an ordinary manifest (see training_manifest), paths relative to its folder
    <root>/shard-00001/manifest.jsonl  ...

``ShardedManifest`` behaves like ``training_manifest.Manifest`` for the trainer
(``path``, ``rows``, ``skipped``, ``report()``), but its ``rows`` is a sequence
that opens a shard's manifest only when one of its rows is asked for and keeps
a few shards in memory: hundreds of thousands of rows never sit in memory at once.
Row ``i`` of the whole set is row ``i - offset`` of its shard, shards in index order.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from typing import Optional

from .training_manifest import ManifestRow, read_manifest

INDEX_FILE = "index.json"
INDEX_FORMAT = "dreamcache-sharded-manifest"
INDEX_VERSION = 1
SHARD_PREFIX = "shard-"
SHARD_MANIFEST = "manifest.jsonl"


def shard_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:05d}"


def is_sharded(path: str) -> bool:
    """True for an index.json of this format or a folder holding one."""
    index = os.path.join(path, INDEX_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(index) or os.path.basename(index) != INDEX_FILE:
        return False
    try:
        with open(index, encoding="utf-8") as handle:
            return json.load(handle).get("format") == INDEX_FORMAT
    except (ValueError, OSError):
        return False


def write_index(root: str, shards: list, extra: Optional[dict] = None) -> str:
    """``<root>/index.json`` listing ``shards`` = [(shard folder name, row count)] in order; returns its path."""
    data = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "rows": sum(count for _, count in shards),
            "shards": [{"manifest": f"{name}/{SHARD_MANIFEST}", "rows": int(count)} for name, count in shards]}
    data.update(extra or {})
    path = os.path.join(root, INDEX_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)
    return path


class ShardRows:
    """The rows of all shards as one read-only sequence, loading shards on demand."""

    def __init__(self, root: str, shards: list, keep: int = 4):
        self.root = root
        self.manifests = [os.path.join(root, entry["manifest"]) for entry in shards]
        self.counts = [int(entry["rows"]) for entry in shards]
        self.offsets = [0]
        for count in self.counts:
            self.offsets.append(self.offsets[-1] + count)
        self.keep = keep
        self.loaded: OrderedDict = OrderedDict()

    def __len__(self):
        return self.offsets[-1]

    def shard_rows(self, shard: int) -> list:
        if shard in self.loaded:
            self.loaded.move_to_end(shard)
            return self.loaded[shard]
        manifest = read_manifest(self.manifests[shard], check_files=False)
        if manifest.skipped or len(manifest.rows) != self.counts[shard]:
            raise ValueError(f"{self.manifests[shard]} has {len(manifest.rows)} usable rows ({len(manifest.skipped)} "
                             f"broken), but {os.path.join(self.root, INDEX_FILE)} lists {self.counts[shard]}. "
                             "Rewrite the index: python -m dreamcache_core.training.synthesize index " + self.root)
        self.loaded[shard] = manifest.rows
        while len(self.loaded) > self.keep:
            self.loaded.popitem(last=False)
        return manifest.rows

    def __getitem__(self, index: int) -> ManifestRow:
        if not isinstance(index, int):
            raise TypeError("ShardRows takes one integer index at a time")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = self.shard_rows(shard)[index - self.offsets[shard]]
        return ManifestRow(index, row.line, row.target, row.reference, row.caption, row.reference_mask, row.id)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]


class ShardedManifest:
    """The manifest the trainer reads from a sharded folder (or its index.json)."""

    def __init__(self, path: str, keep: int = 4):
        index = os.path.join(path, INDEX_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(index):
            raise ValueError(f"{path} holds no {INDEX_FILE}: it is not a finished sharded data set. Finish the "
                             "synthesis (every rank), or write the index: python -m dreamcache_core.training.synthesize index DIR")
        with open(index, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index} is not a sharded manifest index (format {data.get('format')!r}).")
        self.path = os.path.abspath(index)
        self.info = data
        self.rows = ShardRows(os.path.dirname(self.path), data["shards"], keep)
        self.skipped: list = []

    def report(self) -> str:
        return f"{self.path}: {len(self.rows)} rows in {len(self.rows.counts)} shards"
