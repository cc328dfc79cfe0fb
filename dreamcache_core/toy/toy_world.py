"""A procedural toy world for testing and benchmarking DreamCache training on a CPU.

Images (32 x 32 RGB by default) show one subject over a varied background.
A subject is (shape, colour, texture): 6 shapes x 8 colours x 4 textures. It
is placed at a random position and size over a muted background (random
colour, random linear gradient, never white). Captions name the shape only
("a ring"): colour and texture are in the reference, not in the caption.

The reference of an image is built the BootPIG way with the dataset builder's
own functions: the subject is cut onto white (``cut_subject_on_white``) and
augmented (``dataset.augment_reference``).

There is no VAE: ``ToyImageEncoder`` is a fixed, deterministic "encoder" to a
4-channel latent at 1/4 resolution: per 4 x 4 pixel patch, channels 0-2 are an
orthonormal mix of the mean RGB (luminance and two colour differences) and
channel 3 is the patch's luminance standard deviation (texture energy); all
are divided by the SD1.5 latent scale factor (0.18215) so that ComfyUI's
``process_latent_in`` brings them to unit-ish scale, as for real VAE latents.
``ToyImageEncoder.decode`` inverts channels 0-2 for viewing. ``ToyTextEncoder``
maps each word to a fixed pseudo-random vector (seeded by the word).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training.training_data import generator_for

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.12, 0.25, 0.95), "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.90, 0.10, 0.80), "cyan": (0.10, 0.85, 0.90), "orange": (0.98, 0.50, 0.05), "purple": (0.50, 0.10, 0.70),
}
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
SD15_SCALE = 0.18215
_MIX = torch.tensor([[1 / math.sqrt(3)] * 3,
                     [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                     [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]])


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
    from ..training.dataset import AugmentSettings, augment_reference
    from ..masking.reference_mask import cut_subject_on_white

    cut_image, cut_mask = cut_subject_on_white(image, mask, size, margin=0.12)
    return augment_reference(cut_image, cut_mask, generator, AugmentSettings(scale_range=(0.8, 1.0),
                                                                              shift_fraction=0.06,
                                                                              max_rotation_degrees=10.0))


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
