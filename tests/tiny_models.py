"""Tiny SD-shaped ComfyUI models with seeded random weights (ComfyUI imported lazily)."""
import torch

TINY_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CONTEXT_DIM = TINY_SD15["context_dim"]


def tiny_sd15_model(seed: int = 0, dtype=torch.float32, config=None):
    """A ModelPatcher around a tiny SD1.5-shaped U-Net (epsilon prediction) on the CPU, seeded weights."""
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import random_model

    return random_model("sd15", config or TINY_SD15, seed, dtype)


def text_conditioning(seed: int, tokens: int = 8, batch: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=generator), {}]]


def ksample(model, positive, negative, latent, seed=0, steps=3, cfg=5.0, sampler="euler", scheduler="normal"):
    """The stock KSampler node, run as ComfyUI's executor runs it (validated inputs, inference mode)."""
    import nodes as comfy_nodes

    from run_as_comfyui import run_node

    (out,) = run_node(comfy_nodes.KSampler, model, seed, steps, cfg, sampler, scheduler, positive, negative,
                      {"samples": latent}, denoise=1.0)
    return out["samples"]


# SDXL-shaped: no attention at the highest resolution, transformer depth 2, linear proj, adm (pooled + sizes).
TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_POOLED_DIM = 1280  # CLIP-G pooled output; adm = pooled + 6 size embeddings of 256 = 2816


def tiny_sdxl_model(seed: int = 0, dtype=torch.float32, config=None):
    """A ModelPatcher around a tiny SDXL-shaped U-Net (comfy.supported_models.SDXL, epsilon) on the CPU."""
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import random_model

    return random_model("sdxl", config or TINY_SDXL, seed, dtype)


def sdxl_text_conditioning(seed: int, tokens: int = 8, batch: int = 1, size: int = 1024):
    """What CLIPTextEncode gives for SDXL: the token context plus pooled_output (and the size fields)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, TINY_SDXL["context_dim"], generator=generator)
    pooled = torch.randn(batch, SDXL_POOLED_DIM, generator=generator)
    return [[context, {"pooled_output": pooled, "width": size, "height": size, "target_width": size,
                       "target_height": size}]]
