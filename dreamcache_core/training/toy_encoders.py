"""The toy world's stand-ins for a VAE and a text encoder (``train --toy-encoders``; ``toy.toy_world`` uses them).

``ToyImageEncoder`` is a fixed, deterministic "encoder" to a 4-channel latent at 1/4 resolution: per 4 x 4 pixel
patch, channels 0-2 are an orthonormal mix of the mean RGB (luminance and two colour differences) and channel 3
is the patch's luminance standard deviation (texture energy); all are divided by the SD1.5 latent scale factor
(0.18215) so that ComfyUI's ``process_latent_in`` brings them to unit-ish scale, as for real VAE latents.
``ToyImageEncoder.decode`` inverts channels 0-2 for viewing. ``ToyTextEncoder`` maps each word to a fixed
pseudo-random vector (seeded by the word).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sample_draws import generator_for

SD15_SCALE = 0.18215
_MIX = torch.tensor([[1 / math.sqrt(3)] * 3,
                     [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                     [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]])


class ToyImageEncoder:
    """The fixed toy "VAE": [H, W, 3] in 0..1 -> [4, H/4, W/4] (see the module docstring)."""

    def __init__(self, downsample: int = 4):
        self.downsample = downsample

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        planar = (image.float() * 2 - 1).permute(2, 0, 1)[None]
        mean = F.avg_pool2d(planar, self.downsample)[0]                      # [3, h, w]
        colour = torch.einsum("ij,jhw->ihw", _MIX, mean)
        luminance = planar.mean(dim=1, keepdim=True)
        energy = (F.avg_pool2d(luminance ** 2, self.downsample) - F.avg_pool2d(luminance, self.downsample) ** 2)
        texture = 4.0 * energy.clamp_min(0).sqrt()[0]
        return torch.cat([colour, texture], dim=0) / SD15_SCALE

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[4, h, w] -> [h*ds, w*ds, 3] (colour channels only, nearest upsampling), for viewing."""
        colour = torch.einsum("ji,jhw->ihw", _MIX, latent[:3].float() * SD15_SCALE)
        image = ((colour + 1) / 2).clamp(0, 1)
        return F.interpolate(image[None], scale_factor=self.downsample, mode="nearest")[0].permute(1, 2, 0)


class ToyTextEncoder:
    """caption -> ([length, dim] embedding, None): BOS + one fixed random vector per word + padding."""

    def __init__(self, dim: int = 32, length: int = 4):
        self.dim = dim
        self.length = length

    def word(self, word: str) -> torch.Tensor:
        vector = torch.randn(self.dim, generator=generator_for("toy-word", word))
        return vector / vector.norm() * math.sqrt(self.dim)

    def __call__(self, caption: str):
        words = [w for w in caption.lower().replace(",", " ").split() if w][: self.length - 1]
        vectors = [self.word("<bos>")] + [self.word(w) for w in words]
        vectors += [self.word("<pad>")] * (self.length - len(vectors))
        return torch.stack(vectors), None
