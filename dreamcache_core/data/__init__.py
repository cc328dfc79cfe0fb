"""DreamBench data shipped with the pack: the 30 subjects with their classes and the 25 prompts per subject kind.

Source: google/dreambooth, ``dataset/prompts_and_classes.txt`` (commit
e9b8c013ef2e30ab3d5d9018808513e9093e3bc4), the benchmark of Ruiz et al.,
"DreamBooth", CVPR 2023. The images are not shipped: point the tools at a copy
of that repository's ``dataset`` folder.

* ``dreambench_subjects()``: list of ``DreamBenchSubject(name, class_name, kind)``, kind "object" or "live"
  (the 9 cats and dogs).
* ``dreambench_templates(kind)``: the 25 prompt templates verbatim, ``{0}`` = unique token, ``{1}`` = class.
* ``dreambench_prompts(subject, unique_token="")``: the 25 prompts of a subject, whitespace normalised
  ("a dog in the jungle" with the empty token finetuning-free methods use).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SUBJECTS_FILE = os.path.join(DATA_DIR, "dreambench_subjects.json")
PROMPT_FILES = {"object": os.path.join(DATA_DIR, "dreambench_object_prompts.txt"),
                "live": os.path.join(DATA_DIR, "dreambench_live_prompts.txt")}
SOURCE = "google/dreambooth dataset/prompts_and_classes.txt (commit e9b8c013ef2e30ab3d5d9018808513e9093e3bc4)"


@dataclass(frozen=True)
class DreamBenchSubject:
    name: str        # folder name under dataset/, e.g. "dog2"
    class_name: str  # class noun used in the prompts, e.g. "dog"
    kind: str        # "object" or "live"


@lru_cache(maxsize=None)
def _subjects() -> tuple:
    with open(SUBJECTS_FILE, encoding="utf-8") as handle:
        data = json.load(handle)
    return tuple(DreamBenchSubject(s["subject"], s["class"], s["kind"]) for s in data["subjects"])


def dreambench_subjects() -> list[DreamBenchSubject]:
    return list(_subjects())


def dreambench_subject(name: str) -> DreamBenchSubject:
    for subject in _subjects():
        if subject.name == name:
            return subject
    raise ValueError(f"'{name}' is not a DreamBench subject. The subjects are: "
                     f"{', '.join(s.name for s in _subjects())}.")


@lru_cache(maxsize=None)
def _templates(kind: str) -> tuple:
    if kind not in PROMPT_FILES:
        raise ValueError(f"DreamBench prompt kind must be 'object' or 'live', got {kind!r}.")
    with open(PROMPT_FILES[kind], encoding="utf-8") as handle:
        return tuple(line.rstrip("\n") for line in handle if line.strip() and not line.startswith("#"))


def dreambench_templates(kind: str) -> list[str]:
    return list(_templates(kind))


def fill_template(template: str, class_name: str, unique_token: str = "") -> str:
    return " ".join(template.format(unique_token, class_name).split())


def dreambench_prompts(subject: Union[str, DreamBenchSubject], unique_token: str = "") -> list[str]:
    if isinstance(subject, str):
        subject = dreambench_subject(subject)
    return [fill_template(t, subject.class_name, unique_token) for t in _templates(subject.kind)]
