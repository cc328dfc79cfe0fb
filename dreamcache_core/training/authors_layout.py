"""The DreamCache authors' released data set as training rows (plain python).

Layout (what their loader, ``ldm/data/gen_dataset.py``, reads): one sub-folder per object, each holding
triplets named by a common stem::

    <root>/<object>/<stem>_generation.png   the target (and, cut out by its mask, the reference)
    <root>/<object>/<stem>_caption.txt      its caption
    <root>/<object>/<stem>_mask.png         the subject's mask (white = subject)

``AuthorsLayout(root)`` scans the folders once (directory listings only, no file is opened: the set has
about 400K files) and behaves like ``training_manifest.Manifest`` for the trainer: ``rows[i]`` is a
``ManifestRow`` whose target and reference are the same ``_generation.png`` and whose mask is the
``_mask.png``; its caption is read when the row is asked for. Triplets missing their mask or caption are
skipped at the scan with the reason; a corrupt image, an empty caption or an empty mask is found when the row
is read, and the trainer's source skips it then (see ``ManifestSource``).

The reference is the target itself, cut out by the mask and, with ``--augment authors`` (the default for this
layout), augmented on the fly as the authors trained (``reference_augmentation``).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional

from .training_manifest import ManifestRow, SkippedRow, UnusableRow

GENERATION_SUFFIX = "_generation.png"
CAPTION_SUFFIX = "_caption.txt"
MASK_SUFFIX = "_mask.png"
REPORT_LIMIT = 20  # skipped triplets named in a report (the rest are counted by reason)


def _folders(root: str) -> list:
    """The object folders of ``root`` (sorted), and ``root`` itself first when it holds triplets directly."""
    with os.scandir(root) as entries:
        folders = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    return [""] + folders


def is_authors_layout(path: str, folders_to_check: int = 20) -> bool:
    """True when ``path`` is a folder whose first object folders (or itself) hold ``*_generation.png`` files."""
    if not os.path.isdir(path):
        return False
    for folder in _folders(path)[:folders_to_check + 1]:
        try:
            if any(name.endswith(GENERATION_SUFFIX) for name in os.listdir(os.path.join(path, folder))):
                return True
        except OSError:
            continue
    return False


def read_caption(path: str) -> str:
    """The caption in ``path``; ``UnusableRow`` when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as handle:
            caption = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UnusableRow(f"caption cannot be read ({type(error).__name__}: {error}): {path}") from None
    if not caption:
        raise UnusableRow(f"caption is empty: {path}")
    return caption


class AuthorsRows:
    """The triplets as a read-only sequence of ``ManifestRow`` (captions read on access)."""

    def __init__(self, root: str, folders: list, entries: list):
        self.root = root
        self.folders = folders
        self.entries = entries  # (folder number, stem)

    def __len__(self):
        return len(self.entries)

    def paths(self, index: int) -> tuple:
        folder, stem = self.entries[index]
        base = os.path.join(self.root, self.folders[folder], stem)
        return base + GENERATION_SUFFIX, base + CAPTION_SUFFIX, base + MASK_SUFFIX

    def name(self, index: int) -> str:
        folder, stem = self.entries[index]
        return f"{self.folders[folder]}/{stem}" if self.folders[folder] else stem

    def __getitem__(self, index: int) -> ManifestRow:
        if not isinstance(index, int):
            raise TypeError("AuthorsRows takes one integer index at a time")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        target, caption, mask = self.paths(index)
        return ManifestRow(index, 0, target, target, read_caption(caption), mask, self.name(index))

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]


class AuthorsLayout:
    """The trainer's manifest of an authors'-layout folder (see the module docstring)."""

    def __init__(self, root: str, log=None):
        if not os.path.isdir(root):
            raise ValueError(f"--data {root} is not a folder; the authors' layout is a folder of object folders "
                             f"holding <stem>{GENERATION_SUFFIX}, <stem>{CAPTION_SUFFIX} and <stem>{MASK_SUFFIX}.")
        self.path = os.path.abspath(root)
        self.skipped: list = []
        self.warnings: list = []
        folders = _folders(self.path)
        entries = []
        for number, folder in enumerate(folders):
            directory = os.path.join(self.path, folder)
            try:
                names = set(os.listdir(directory))
            except OSError as error:
                self.skipped.append(SkippedRow(0, f"folder cannot be listed ({error})", folder))
                continue
            for name in sorted(names):
                if not name.endswith(GENERATION_SUFFIX):
                    continue
                stem = name[:-len(GENERATION_SUFFIX)]
                missing = [suffix for suffix in (MASK_SUFFIX, CAPTION_SUFFIX) if stem + suffix not in names]
                if missing:
                    what = " and ".join("mask" if s == MASK_SUFFIX else "caption" for s in missing)
                    self.skipped.append(SkippedRow(0, f"no {what} ({', '.join(stem + s for s in missing)} missing)",
                                                   f"{folder}/{stem}" if folder else stem))
                    continue
                entries.append((number, stem))
            if log is not None and number and number % 20000 == 0:
                log(f"scanned {number} of {len(folders) - 1} object folders ({len(entries)} triplets)")
        self.rows = AuthorsRows(self.path, folders, entries)

    def reasons(self) -> Counter:
        return Counter(row.reason.split(" (")[0] for row in self.skipped)

    def report(self, limit: Optional[int] = REPORT_LIMIT) -> str:
        folders = len(self.rows.folders) - 1
        lines = [f"{self.path}: {len(self.rows)} triplets in {folders} object folders, {len(self.skipped)} skipped"
                 + ("".join(f"; {reason}: {count}" for reason, count in sorted(self.reasons().items())))]
        shown = self.skipped if limit is None else self.skipped[:limit]
        lines += [f"  skipped {row.id}: {row.reason}" for row in shown]
        if len(shown) < len(self.skipped):
            lines.append(f"  ... and {len(self.skipped) - len(shown)} more")
        return "\n".join(lines)
