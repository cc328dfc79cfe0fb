"""The training manifest: JSONL, one training triplet per line (plain torch, no ComfyUI).

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
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional


from ..io.image_files import check_image_file, load_mask


MANIFEST_FIELDS = ("target", "reference", "reference_mask", "caption", "id")
REQUIRED_FIELDS = ("target", "reference", "caption")


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
