"""Which segmented subjects make usable training references (plain torch).

A segmenter returns a ``Detection`` per image: the subject mask, and the
detector's confidence when a detector found it (None for the automatic SAM
prompt, which has no score). ``rejection`` says why a detection is unusable,
as one of the ``REASONS`` plus a detail, or None when it is kept:

* ``no detection``: the detector found no box for the noun;
* ``low detection score``: the best box scored under ``min_score``;
* ``empty mask``: no pixel at or above 0.5;
* ``tiny mask``: the subject covers less than ``min_fraction`` of the image;
* ``whole-image mask``: more than ``max_fraction`` (the segmenter took the background).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NO_DETECTION = "no detection"
LOW_SCORE = "low detection score"
EMPTY_MASK = "empty mask"
TINY_MASK = "tiny mask"
WHOLE_IMAGE_MASK = "whole-image mask"
REASONS = (NO_DETECTION, LOW_SCORE, EMPTY_MASK, TINY_MASK, WHOLE_IMAGE_MASK)


@dataclass(frozen=True)
class Detection:
    mask: Optional[torch.Tensor]   # [H, W] in 0..1, None when nothing was detected
    score: Optional[float] = None  # detector confidence of the box the mask came from
    box: Optional[tuple] = None    # (x0, y0, x1, y1) in pixels


@dataclass(frozen=True)
class FilterSettings:
    min_score: float = 0.35
    min_fraction: float = 0.02
    max_fraction: float = 0.85

    def __post_init__(self):
        if not 0.0 <= self.min_fraction <= self.max_fraction <= 1.0:
            raise ValueError(f"The mask fractions must satisfy 0 <= --min-mask-fraction ({self.min_fraction}) <= "
                             f"--max-mask-fraction ({self.max_fraction}) <= 1.")


@dataclass(frozen=True)
class Rejection:
    reason: str  # one of REASONS
    detail: str

    def __str__(self):
        return f"{self.reason}: {self.detail}"


def mask_fraction(mask: torch.Tensor) -> float:
    return float((mask >= 0.5).float().mean())


def rejection(detection: Detection, settings: FilterSettings) -> Optional[Rejection]:
    if detection.mask is None:
        return Rejection(NO_DETECTION, "the detector found no box for the subject noun")
    if detection.score is not None and detection.score < settings.min_score:
        return Rejection(LOW_SCORE, f"best box scored {detection.score:.3f} < {settings.min_score}")
    fraction = mask_fraction(detection.mask)
    if fraction == 0.0:
        return Rejection(EMPTY_MASK, "no pixel of the mask is subject")
    if fraction < settings.min_fraction:
        return Rejection(TINY_MASK, f"subject covers {fraction:.4f} of the image < {settings.min_fraction}")
    if fraction > settings.max_fraction:
        return Rejection(WHOLE_IMAGE_MASK, f"subject covers {fraction:.4f} of the image > {settings.max_fraction}")
    return None
