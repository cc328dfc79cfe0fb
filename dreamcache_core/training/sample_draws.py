"""Counter-based randomness for training (plain torch).

Everything random in a training step (the order of samples, timestep, noise,
caption and reference dropout, the reference's online augmentation) comes from
counter-based generators keyed by (seed, draw number), never from global RNG state, so a run resumed from a
checkpoint draws exactly what the uninterrupted run would have drawn, and the
draws do not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Optional

import torch



def mix_seed(*parts) -> int:
    """A 63-bit seed from any ints/strings (stable across runs, machines and Python versions)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(str(part).encode() + b"\x00")
    return struct.unpack("<Q", digest.digest())[0] & ((1 << 63) - 1)


def generator_for(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def epoch_permutation(seed: int, epoch: int, count: int) -> torch.Tensor:
    return torch.randperm(count, generator=generator_for("order", seed, epoch))


def sample_index(seed: int, draw: int, count: int) -> int:
    """The dataset index of the ``draw``-th sample of the (infinite, epoch-shuffled) stream."""
    epoch, position = divmod(draw, count)
    return int(epoch_permutation(seed, epoch, count)[position])


def encode_seed(index: int) -> int:
    """Seed of the t = 1 noise of sample ``index``'s reference (Encode's seed input): fixed per sample, so
    precomputed caches and on-the-fly ones are the same and can be shared by training runs."""
    return int(index)


@dataclass(frozen=True)
class SampleDraw:
    """What one sample of one step draws: where it comes from and its randomness."""

    draw: int
    index: int
    timestep: int
    drop_caption: bool
    drop_reference: bool
    generator_seed: int
    augment_seed: Optional[int] = None  # seeds the reference's online augmentation (None: the unaugmented reference)

    def augment_generator(self) -> Optional[torch.Generator]:
        return None if self.augment_seed is None else torch.Generator().manual_seed(self.augment_seed)

    def noise(self, shape) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.generator_seed)
        return torch.randn(tuple(shape), generator=generator)


def draw_sample(seed: int, draw: int, count: int, caption_dropout: float, reference_dropout: float,
                timestep_range: tuple = (0, 999)) -> SampleDraw:
    generator = generator_for("sample", seed, draw)
    u_caption, u_reference = torch.rand(2, generator=generator).tolist()
    low, high = timestep_range
    timestep = int(torch.randint(int(low), int(high) + 1, (1,), generator=generator))
    noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return SampleDraw(draw, sample_index(seed, draw, count), timestep, u_caption < caption_dropout,
                      u_reference < reference_dropout, noise_seed, mix_seed("reference augmentation", seed, draw))
