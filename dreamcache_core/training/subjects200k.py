"""Subjects200K (Hugging Face ``Yuanshi/Subjects200K``) read from a local folder of its parquet files.

Each row holds one subject seen twice:

* ``image``: one picture with the two views side by side (as the ``datasets`` library writes an image: a
  struct ``{bytes, path}``; plain bytes are accepted too). In the released set it is 1056 x 528: two 512 x 512
  tiles and 16 px of padding each way, cropped as OminiControl crops them, (8, 8, 520, 520) and
  (528, 8, 1040, 520). ``view_boxes`` finds the tiles from the real size: the picture must be twice as wide as
  high, and the padding scales with the height (8 / 528 of it);
* ``description``: ``{item, description_0, description_1, category, description_valid}``; ``item`` is the
  subject's noun, ``description_0`` captions the left view and ``description_1`` the right one;
* ``quality_assessment``: ``{compositeStructure, objectConsistency, imageQuality}``, each scored 0-5;
* ``collection``: which part of the set the row comes from.

A row gives two cross-view triplets: reference = one view cut out, target = the other view with its own
caption. The set has no masks; ``prepare_subjects200k`` segments the references once and writes a sharded
manifest the trainer reads.

The files are streamed a row group at a time in small batches (``pyarrow``, imported only here: ``pip
install pyarrow``); row groups without a wanted row are not read at all. Rows are numbered across the files in
sorted path order. A file that cannot be opened contributes no rows and is reported; a row group that cannot be
read, or a row that is malformed, yields a ``BadRow`` with the reason instead of a ``PairRow``.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .training_manifest import UnusableRow

COLUMNS = ("image", "description", "quality_assessment", "collection")
QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")
QUALITY_MAX = 5
FRAME_FRACTION = 8 / 528  # the frame around each view, as a fraction of the picture's height
BATCH_ROWS = 16           # rows converted to python objects at a time


def import_parquet():
    """``pyarrow.parquet``, or a ValueError saying how to install it."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ValueError("Reading Subjects200K's parquet files needs pyarrow, which is not installed: "
                         "pip install pyarrow") from None
    return parquet


def parquet_files(folder: str) -> list:
    """The ``*.parquet`` files under ``folder`` (recursively, as the hub's ``data/`` folder holds them), sorted."""
    found = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += [os.path.join(directory, name) for name in names if name.endswith(".parquet")]
    return sorted(found)


def is_parquet_folder(path: str) -> bool:
    return os.path.isdir(path) and bool(parquet_files(path))


@dataclass
class ParquetFile:
    path: str
    rows: int = 0
    row_groups: tuple = ()       # rows per row group
    problem: Optional[str] = None


def survey(folder: str) -> list:
    """Every parquet file of ``folder`` with its row count (read from the footer only) or why it cannot be read."""
    parquet = import_parquet()
    files = []
    for path in parquet_files(folder):
        try:
            metadata = parquet.ParquetFile(path).metadata
            groups = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
            files.append(ParquetFile(path, sum(groups), groups))
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
            files.append(ParquetFile(path, problem=f"cannot be read as parquet ({type(error).__name__}: {error})"))
    return files


@dataclass(frozen=True)
class PairRow:
    """One row: the two-view picture (encoded) and what describes it."""

    number: int
    image_bytes: bytes
    item: str
    descriptions: tuple          # (left view's caption, right view's caption)
    category: str
    valid: bool
    quality: tuple               # QUALITY_KEYS order
    collection: str

    def min_quality(self) -> float:
        return min(self.quality)


@dataclass(frozen=True)
class BadRow:
    number: int
    reason: str


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def parse_row(number: int, record: dict):
    """A ``PairRow`` from one row as ``pyarrow`` gives it (``to_pylist``), or a ``BadRow`` saying what is wrong."""
    image = record.get("image")
    if isinstance(image, dict):
        image = image.get("bytes")
    if not isinstance(image, (bytes, bytearray)) or not image:
        return BadRow(number, "malformed row: no image bytes")
    description = record.get("description")
    if not isinstance(description, dict):
        return BadRow(number, "malformed row: no description struct")
    quality = record.get("quality_assessment")
    if not isinstance(quality, dict):
        return BadRow(number, "malformed row: no quality_assessment struct")
    scores = []
    for key in QUALITY_KEYS:
        value = quality.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return BadRow(number, f"malformed row: quality_assessment.{key} is {value!r}")
        scores.append(value)
    valid = description.get("description_valid")
    return PairRow(number, bytes(image), _text(description.get("item")),
                   (_text(description.get("description_0")), _text(description.get("description_1"))),
                   _text(description.get("category")), valid is not False, tuple(scores),
                   _text(record.get("collection")))


def iter_rows(files: list, wanted: Callable[[int], bool] = lambda number: True) -> Iterator:
    """``PairRow`` / ``BadRow`` for every wanted row number, in order, one row group at a time."""
    parquet = import_parquet()
    first = 0
    for entry in files:
        if entry.problem:
            continue
        offsets = [first]
        for count in entry.row_groups:
            offsets.append(offsets[-1] + count)
        first = offsets[-1]
        groups = [g for g in range(len(entry.row_groups))
                  if any(wanted(n) for n in range(offsets[g], offsets[g + 1]))]
        if not groups:
            continue
        handle = parquet.ParquetFile(entry.path)
        columns = [name for name in COLUMNS if name in handle.schema_arrow.names]
        for group in groups:
            number = offsets[group]
            try:
                for batch in handle.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns):
                    for record in batch.to_pylist():
                        if wanted(number):
                            yield parse_row(number, record)
                        number += 1
            except Exception as error:  # a damaged row group: its remaining rows are reported, the rest go on
                reason = f"unreadable row (row group {group} of {os.path.basename(entry.path)}: {type(error).__name__})"
                for rest in range(number, offsets[group + 1]):
                    if wanted(rest):
                        yield BadRow(rest, reason)


# --------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------

def decode_picture(data: bytes) -> torch.Tensor:
    """The encoded picture as float [H, W, 3] in 0..1; ``UnusableRow`` when it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as error:  # PIL raises many types for broken data
        message = re.sub(r" ?<[^>]*>", "", str(error))  # no object addresses: the same row gives the same reason
        raise UnusableRow(f"corrupt image ({type(error).__name__}: {message})") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(rgb.size[1], rgb.size[0], 3).float() / 255.0


def view_boxes(width: int, height: int) -> tuple:
    """((x0, y0, x1, y1) of the left view, same of the right one) for a two-view picture of this size.

    OminiControl's crops, scaled to the picture: with the frame p = 8 / 528 of the height and the view side
    T = height - 2 p, the left view is (p, p, p + T, p + T) and the right one (T + 2 p, p, 2 T + 2 p, p + T),
    i.e. (8, 8, 520, 520) and (528, 8, 1040, 520) for the released 1056 x 528 pictures."""
    if height < 8 or abs(width - 2 * height) > 2:
        raise UnusableRow(f"unexpected layout: the picture is {width}x{height}, not two square views side by side "
                          "(twice as wide as high)")
    frame = round(height * FRAME_FRACTION)
    side = height - 2 * frame
    return (frame, frame, frame + side, frame + side), (side + 2 * frame, frame, 2 * side + 2 * frame, frame + side)


def split_views(picture: torch.Tensor) -> tuple:
    """(left view, right view) of a two-view picture [H, W, 3]."""
    views = []
    for x0, y0, x1, y1 in view_boxes(picture.shape[1], picture.shape[0]):
        views.append(picture[y0:y1, x0:x1].contiguous())
    return tuple(views)
