"""Captions of concrete objects in contexts, for the synthetic training set (plain python).

The captions file (what ``synthesize`` reads, what any LLM can write): one row
a line, ``caption<TAB>subject noun``; blank lines and lines starting with ``#``
are ignored. The noun is what the detector is prompted with ("mug",
"alarm clock") and should appear in the caption.

The generator builds its objects combinatorially from the small lists in
``dreamcache_core/data`` (adjective x material x object noun, e.g. "a striped
ceramic mug": 32 x 20 x 104 = 66,560 distinct objects) and places each in a
context through a template ("a photo of {object} {context}"). Caption ``i`` of
seed ``s`` depends on (s, i) only, so a file of N captions is a prefix of the
file of N + M captions with the same seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

from .sample_draws import generator_for

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
VOCABULARY_FILES = {"adjectives": "synthetic_adjectives.txt", "materials": "synthetic_materials.txt",
                    "objects": "synthetic_objects.txt", "contexts": "synthetic_contexts.txt",
                    "templates": "synthetic_templates.txt"}


class CaptionsFileError(ValueError):
    """A captions file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class CaptionRow:
    number: int   # 0-based position among the caption rows (the row's identity: its seed, shard and file names)
    line: int     # 1-based line in the file
    caption: str
    noun: str


def read_list(path: str) -> tuple:
    with open(path, encoding="utf-8") as handle:
        items = tuple(line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#"))
    if not items:
        raise ValueError(f"{path} holds no entries (one a line; lines starting with # are comments).")
    return items


@lru_cache(maxsize=None)
def vocabulary() -> dict:
    """name -> tuple of entries, for every list in VOCABULARY_FILES."""
    return {name: read_list(os.path.join(DATA_DIR, file)) for name, file in VOCABULARY_FILES.items()}


def distinct_object_count() -> int:
    words = vocabulary()
    return len(words["adjectives"]) * len(words["materials"]) * len(words["objects"])


def with_article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def caption_at(seed: int, number: int) -> tuple:
    """(caption, noun) number ``number`` of the stream of ``seed``."""
    words = vocabulary()
    generator = generator_for("synthetic-caption", seed, number)
    picks = {}
    for name in ("adjectives", "materials", "objects", "contexts", "templates"):
        picks[name] = words[name][int(torch.randint(len(words[name]), (1,), generator=generator))]
    noun = picks["objects"]
    subject = with_article(f"{picks['adjectives']} {picks['materials']} {noun}")
    caption = picks["templates"].format(object=subject, context=picks["contexts"])
    return caption, noun


def generate_captions(count: int, seed: int = 0) -> Iterator[tuple]:
    for number in range(count):
        yield caption_at(seed, number)


def write_captions(path: str, count: int, seed: int = 0) -> int:
    """Write ``count`` generated captions as a captions file; returns the number written."""
    if count < 1:
        raise ValueError(f"--count must be at least 1 (got {count}).")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(f"# {count} synthetic captions, seed {seed}: caption<TAB>subject noun\n")
        for caption, noun in generate_captions(count, seed):
            handle.write(f"{caption}\t{noun}\n")
    os.replace(path + ".tmp", path)
    return count


def read_captions(path: str) -> Iterator[CaptionRow]:
    """Stream the rows of a captions file (never the whole file in memory); raises CaptionsFileError on a bad line."""
    if not os.path.isfile(path):
        raise CaptionsFileError(f"Captions file not found: {path}. Write one with "
                                "`python -m dreamcache_core.training.synthesize captions --count N --out captions.tsv`.")
    number = 0
    with open(path, encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            parts = text.rstrip("\r\n").split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise CaptionsFileError(f"{path} line {line_number}: expected 'caption<TAB>subject noun', got "
                                        f"{stripped[:80]!r}. Fix the line or delete it.")
            yield CaptionRow(number, line_number, parts[0].strip(), parts[1].strip())
            number += 1


def count_captions(path: str) -> int:
    return sum(1 for _ in read_captions(path))
