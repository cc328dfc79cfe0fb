"""The headless ComfyUI pipeline: a checkpoint's MODEL, CLIP and VAE with the operations generation needs (CLIP
Text Encode, VAE Encode / Decode), and the ``Sampler`` that samples one (adapter, cache) pair with the chosen
guidance. Headless generation, synthesis (the base model's images) and training's validation samples all run
through here.
"""
from __future__ import annotations

import torch

from ..method.controls import Controls
from ..method.guidance import REFERENCE_CHUNKS
from ..method.patch import POSITIVE_CHUNK
from .combined_guider import combined_guider
from .injection_builder import build_injection
from .injection_patches import attach_injection
from .models import comfy_nodes_module, load_checkpoint
from .sampling import empty_latent_for, guider_sample, ksampler_sample, prepare_noise

GUIDANCE_MODES = ("joint", "combined", "off")


class Pipeline:
    """The model and the ComfyUI operations generation needs. Tests substitute the encoders."""

    def __init__(self, model, clip=None, vae=None):
        self.model = model
        self.clip = clip
        self.vae = vae

    def encode_text(self, text: str):
        """CONDITIONING of ``text`` (CLIP Text Encode)."""
        (conditioning,) = comfy_nodes_module().CLIPTextEncode().encode(self.clip, text)
        return conditioning

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Latent of IMAGE [B, H, W, 3] (VAE Encode)."""
        (latent,) = comfy_nodes_module().VAEEncode().encode(self.vae, image[..., :3])
        return latent["samples"]

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] of latents (VAE Decode)."""
        (images,) = comfy_nodes_module().VAEDecode().decode(self.vae, {"samples": samples})
        return images


def load_pipeline(checkpoint: str) -> Pipeline:
    """Load Checkpoint: MODEL, CLIP and VAE from one checkpoint file."""
    return Pipeline(*load_checkpoint(checkpoint, need_encoders=True))


def window_controls(settings: dict) -> Controls:
    """The controls generation sets: the strength and its window (the rest as Apply DreamCache's defaults)."""
    return Controls(strength=settings["strength"], start_percent=settings["start_percent"],
                    end_percent=settings["end_percent"])


class Sampler:
    """Samples latents for one (adapter, cache) pair with the chosen guidance; reused across prompts."""

    def __init__(self, model, adapter, cache, settings: dict):
        self.model = model
        self.settings = settings
        guidance = settings["guidance"]
        self.injection = None
        if guidance == "off" or cache is None or settings["strength"] == 0:
            self.sampling_model = model
        elif guidance == "joint":
            self.injection = build_injection(model, adapter, cache, window_controls(settings), (POSITIVE_CHUNK,),
                                             memory_managed=True)
            self.sampling_model = attach_injection(model.clone(), self.injection)
        elif guidance == "combined":
            self.injection = build_injection(model, adapter, cache, window_controls(settings), REFERENCE_CHUNKS,
                                             memory_managed=True)
            self.sampling_model = model
        else:
            raise ValueError(f"--guidance must be one of {GUIDANCE_MODES}, got {guidance!r}.")

    def sample(self, positive, negative, seeds: list[int], latent_shape) -> torch.Tensor:
        s = self.settings
        latent = empty_latent_for(self.model, torch.zeros((len(seeds),) + tuple(latent_shape)))
        noise = torch.cat([prepare_noise(latent[:1], seed) for seed in seeds])
        if s["guidance"] == "combined" and self.injection is not None:
            guider = combined_guider(self.model, self.injection, positive, negative, s["text_cfg"], s["image_cfg"])
            return guider_sample(guider, noise, latent, s["steps"], s["sampler"], s["scheduler"], seeds[0])
        cfg = s["text_cfg"] if s["guidance"] == "combined" else s["cfg"]
        return ksampler_sample(self.sampling_model, noise, s["steps"], cfg, s["sampler"], s["scheduler"], positive,
                               negative, latent, seeds[0])
