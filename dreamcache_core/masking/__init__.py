"""Cutting the subject out: reference masks, SAM (segment-anything), text-prompted Grounding-DINO + SAM,
and the filters that reject bad masks."""
