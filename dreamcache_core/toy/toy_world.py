"""A procedural toy world for testing and benchmarking DreamCache training on a CPU.

Images (32 x 32 RGB by default) show one subject over a varied background.
A subject is (shape, colour, texture): 6 shapes x 8 colours x 4 textures. It
is placed at a random position and size over a muted background (random
colour, random linear gradient, never white). Captions name the shape only
("a ring"): colour and texture are in the reference, not in the caption.

The reference of an image is built the BootPIG way with the dataset builder's
own functions: the subject is cut onto white (``cut_subject_on_white``) and
augmented (``dataset.augment_reference``).

There is no VAE and no text encoder: the world is encoded by ``ToyImageEncoder``
(a fixed, deterministic 4-channel latent at 1/4 resolution) and ``ToyTextEncoder``
(a fixed pseudo-random vector per word), which live in ``training.toy_encoders``
(where ``train --toy-encoders`` finds them) and are part of this module's world.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training.toy_encoders import ToyImageEncoder, ToyTextEncoder  # noqa: F401 (the world's encoders)
from ..training.sample_draws import generator_for
from ..masking.reference_mask import cut_subject_on_white
from ..training.dataset import AugmentSettings, augment_reference

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.12, 0.25, 0.95), "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.90, 0.10, 0.80), "cyan": (0.10, 0.85, 0.90), "orange": (0.98, 0.50, 0.05), "purple": (0.50, 0.10, 0.70),
}
TEXTURES = ("solid", "hstripes", "vstripes", "checker")


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def all_subjects() -> list:
    return [Subject(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]


def split_subjects(held_out_fraction: float = 0.25, seed: int = 0):
    """(train, held_out): held-out subjects are unseen combinations; every shape, colour and texture
    still occurs in training."""
    subjects = all_subjects()
    order = torch.randperm(len(subjects), generator=generator_for("toy-split", seed)).tolist()
    count = int(round(held_out_fraction * len(subjects)))
    held = [subjects[i] for i in order[:count]]
    train = [subjects[i] for i in order[count:]]
    for attribute in ("shape", "colour", "texture"):
        assert {getattr(s, attribute) for s in train} == {getattr(s, attribute) for s in subjects}
    return train, held


def caption_of(subject: Subject) -> str:
    return f"a {subject.shape}"


def shape_mask(shape: str, cx: float, cy: float, size: float, height: int, width: int, supersample: int = 4) -> torch.Tensor:
    """Antialiased [H, W] mask of ``shape`` centred at (cx, cy) pixels with side/diameter ``size``."""
    ys = (torch.arange(height * supersample, dtype=torch.float32) + 0.5) / supersample
    xs = (torch.arange(width * supersample, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(ys - cy, xs - cx, indexing="ij")
    r = size / 2
    if shape == "circle":
        inside = x ** 2 + y ** 2 <= r ** 2
    elif shape == "ring":
        d = (x ** 2 + y ** 2).sqrt()
        inside = (d <= r) & (d >= 0.55 * r)
    elif shape == "square":
        inside = (x.abs() <= 0.85 * r) & (y.abs() <= 0.85 * r)
    elif shape == "diamond":
        inside = x.abs() + y.abs() <= r
    elif shape == "triangle":
        inside = (y <= 0.8 * r) & (y >= -r + 2 * x.abs() * 0.9)
    elif shape == "cross":
        arm = 0.33 * r
        inside = ((x.abs() <= arm) & (y.abs() <= r)) | ((y.abs() <= arm) & (x.abs() <= r))
    else:
        raise ValueError(f"unknown shape {shape}")
    mask = inside.float()[None, None]
    return F.avg_pool2d(mask, supersample)[0, 0]


def texture_pattern(texture: str, height: int, width: int, period: int = 8) -> torch.Tensor:
    """[H, W] of 0/1, anchored to the image grid (half-periods align with the encoder's 4 px patches)."""
    y = torch.arange(height)[:, None].expand(height, width)
    x = torch.arange(width)[None, :].expand(height, width)
    half = period // 2
    if texture == "solid":
        return torch.zeros(height, width)
    if texture == "hstripes":
        return ((y // half) % 2).float()
    if texture == "vstripes":
        return ((x // half) % 2).float()
    if texture == "checker":
        return (((x // half) + (y // half)) % 2).float()
    raise ValueError(f"unknown texture {texture}")


def render(subject: Subject, generator: torch.Generator, size: int = 32, min_scale: float = 0.45,
           max_scale: float = 0.75, period: int = 8, grey_range: tuple = (0.3, 0.65), tint: float = 0.25,
           gradient: float = 0.3):
    """(image [H, W, 3], mask [H, W]) of ``subject`` at a random place and size over a random background.

    The subject's side is ``min_scale..max_scale`` of the image; its texture has a period of ``period`` px;
    the background is a grey in ``grey_range`` plus a random tint (each channel +-``tint``/2) plus a random
    linear gradient (up to ``gradient`` end to end)."""
    u = torch.rand(8, generator=generator).tolist()
    side = size * (min_scale + (max_scale - min_scale) * u[0])
    margin = side / 2
    cx = margin + (size - 2 * margin) * u[1]
    cy = margin + (size - 2 * margin) * u[2]
    mask = shape_mask(subject.shape, cx, cy, side, size, size)
    base_grey = grey_range[0] + (grey_range[1] - grey_range[0]) * u[3]
    tint_rgb = (torch.rand(3, generator=generator) - 0.5) * tint
    background = (base_grey + tint_rgb).clamp(0.05, 0.85)
    angle = 2 * math.pi * u[4]
    ramp = (torch.arange(size, dtype=torch.float32) / size - 0.5)
    ramp = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) * (gradient * u[5])
    background_image = (background[None, None, :] + ramp[..., None]).clamp(0, 1)
    colour = torch.tensor(COLOURS[subject.colour])
    pattern = texture_pattern(subject.texture, size, size, period)
    subject_image = colour[None, None, :] * (1.0 - 0.55 * pattern[..., None])
    image = background_image * (1 - mask[..., None]) + subject_image * mask[..., None]
    return image.clamp(0, 1), mask


def make_reference(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, size: int = 32):
    """The BootPIG reference: subject cut onto white, then augmented (the dataset builder's code)."""
    cut_image, cut_mask = cut_subject_on_white(image, mask, size, margin=0.12)
    return augment_reference(cut_image, cut_mask, generator, AugmentSettings(scale_range=(0.8, 1.0),
                                                                              shift_fraction=0.06,
                                                                              max_rotation_degrees=10.0))


def toy_unet_config(context_dim: int = 32, model_channels: int = 32, channel_mult=(1, 2, 2),
                    head_channels: int = 16) -> dict:
    """An SD1.5-shaped ComfyUI UNet config (middle + decoder transformers, linear proj) small enough for a CPU."""
    levels = len(channel_mult)
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [1] * levels, "transformer_depth": [1] * levels, "channel_mult": list(channel_mult),
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": context_dim,
        "num_head_channels": head_channels, "transformer_depth_output": [1] * (2 * levels),
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


@torch.no_grad()
def initialise_unet(module: torch.nn.Module, seed: int = 0):
    """Seeded initialisation (ComfyUI's ops skip it): N(0, 1/fan_in) weights, zero biases, unit norms, and
    the U-Net's output convolution at zero (as SD's zero_module)."""
    generator = generator_for("toy-init", seed)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
    out = getattr(module, "out", None)
    if out is not None:
        for p in out[-1].parameters():
            p.zero_()
    return module
