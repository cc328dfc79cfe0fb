"""The U-Net shapes the benchmarks run: ComfyUI's SD1.5 and SDXL U-Net configs and smaller ones of the same
layout (``tiny`` and ``tiny-sdxl`` for tests, ``mid`` for a CPU), each with its latent size and text tokens."""
from __future__ import annotations

from dataclasses import dataclass

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "sd15" or "sdxl"
    unet: dict
    latent: int  # latent side; the image side is 8x
    tokens: int = 77  # text tokens of the conditioning
    description: str = ""


SHAPES = {
    "tiny": Shape("tiny", "sd15", dict(SD15_UNET, model_channels=32, context_dim=64), 16, 8,
                  "SD1.5 layout, width 32, 16x16 latent (tests)"),
    "tiny-sdxl": Shape("tiny-sdxl", "sdxl", dict(SDXL_UNET, model_channels=32, context_dim=64,
                                                  transformer_depth=[0, 0, 2, 2, 2, 2], transformer_depth_middle=2,
                                                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 2, 2, 2],
                                                  num_head_channels=16), 16, 8,
                       "SDXL layout, width 32, depth 2, 16x16 latent (tests)"),
    "mid": Shape("mid", "sd15", dict(SD15_UNET, model_channels=96), 32, 77,
                 "SD1.5 layout (8 heads, text width 768) at width 96, 32x32 latent (256 px)"),
    "sd15-512": Shape("sd15-512", "sd15", dict(SD15_UNET), 64, 77, "SD1.5 U-Net (860M), 512x512"),
    "sdxl-1024": Shape("sdxl-1024", "sdxl", dict(SDXL_UNET), 128, 77, "SDXL U-Net (2.6B), 1024x1024"),
}
FULL_SHAPES = ("sd15-512", "sdxl-1024")
