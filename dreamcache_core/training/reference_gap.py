"""Does an adapter use its reference? The matched-vs-shuffled reference loss gap on held-out samples.

For each held-out sample and each noise band (t in [0, 333), [333, 666),
[666, 999]) a fixed number of (t, noise) draws is made from generators keyed by
the band's name only, so the draws are the same at every call: the same
adapter gives the same numbers, and a curve over training steps compares like
with like. Each draw is scored with the denoising loss (the base's own target,
``training_loss.denoising_losses``) three ways on the same (sample, t, noise):
with the sample's own reference cache ("matched"), with another held-out
sample's ("shuffled") and, optionally, with no adapter ("none"). Extra adapter
capacity lowers matched and shuffled alike; only shuffled - matched > 0 shows
that subject information flows through the cache. The toy benchmark and the
trainer's validation both measure it with ``reference_gap``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .sample_draws import generator_for
from .training_loss import LossRow, denoising_losses, sigma_of_timestep

TIMESTEP_BANDS = (("low", 0, 332), ("mid", 333, 665), ("high", 666, 999))
GAP_MODES = ("matched", "shuffled", "none")


def band_index(timestep: int) -> int:
    """Position in ``TIMESTEP_BANDS`` of ``timestep`` (0..999)."""
    for position, (_, low, high) in enumerate(TIMESTEP_BANDS):
        if low <= timestep <= high:
            return position
    raise ValueError(f"timestep {timestep} is outside 0..999")


def shifted_partners(count: int) -> list[int]:
    """A fixed shuffle for held-out samples without labels: sample i's shuffled reference is sample
    (i + count // 2) mod count, never its own."""
    if count < 2:
        raise ValueError("The matched-vs-shuffled gap needs at least 2 held-out samples (the shuffled reference "
                         "comes from another sample).")
    return [(i + count // 2) % count for i in range(count)]


def reference_gap(model_patcher, adapter, samples: Sequence, caches: Sequence, partner: Sequence[int],
                  per_band: int = 2, batch: int = 48, modes: Sequence[str] = GAP_MODES, attention=None,
                  autocast=None) -> dict:
    """{(mode, band): mean loss} for band in low/mid/high/all and mode in ``modes``.

    samples: objects with ``target_latent``, ``text_cond`` and ``text_pooled`` (``PreparedSample``);
    caches[i]: sample i's reference cache; partner[i]: the sample whose cache is sample i's shuffled
    reference. "all" is the mean of the three bands. No gradients.
    """
    unknown = [m for m in modes if m not in GAP_MODES]
    if unknown:
        raise ValueError(f"Unknown gap mode(s) {unknown}; use {GAP_MODES}.")
    results = {}
    for name, low, high in TIMESTEP_BANDS:
        generator = generator_for("eval", name)
        rows = {mode: [] for mode in modes}
        for i, sample in enumerate(samples):
            for _ in range(per_band):
                t = int(torch.randint(low, high + 1, (1,), generator=generator))
                noise = torch.randn(sample.target_latent.shape, generator=generator)
                sigma = float(sigma_of_timestep(model_patcher, [t])[0])
                for mode in modes:
                    cache = {"matched": caches[i], "shuffled": caches[partner[i]], "none": None}[mode]
                    rows[mode].append(LossRow(sample.target_latent, noise, sigma, sample.text_cond,
                                              sample.text_pooled, cache))
        for mode, mode_rows in rows.items():
            losses = []
            with torch.no_grad():
                for k in range(0, len(mode_rows), batch):
                    losses.append(denoising_losses(model_patcher, adapter if mode != "none" else None,
                                                   mode_rows[k:k + batch], attention, autocast))
            results[(mode, name)] = float(torch.cat(losses).mean())
    for mode in modes:
        results[(mode, "all")] = sum(results[(mode, b[0])] for b in TIMESTEP_BANDS) / len(TIMESTEP_BANDS)
    return results


GAP_FIELDS = ["step", "matched", "shuffled", "gap", "gap_fraction"] + [
    f"{what}_{band}" for band, _, _ in TIMESTEP_BANDS for what in ("matched", "shuffled", "gap")]


def gap_record(results: dict, step: Optional[int] = None) -> dict:
    """One flat row of ``GAP_FIELDS`` (floats; gap = shuffled - matched, gap_fraction = gap / shuffled)."""
    record = {"step": step}
    for band in ["all"] + [b[0] for b in TIMESTEP_BANDS]:
        matched, shuffled = results[("matched", band)], results[("shuffled", band)]
        suffix = "" if band == "all" else f"_{band}"
        record[f"matched{suffix}"] = matched
        record[f"shuffled{suffix}"] = shuffled
        record[f"gap{suffix}"] = shuffled - matched
    record["gap_fraction"] = record["gap"] / record["shuffled"] if record["shuffled"] else float("nan")
    return record
