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


@torch.no_grad()
def initialise_seeded(module: torch.nn.Module, seed: int = 0):
    """ComfyUI's ops skip init: fill every parameter and buffer with seeded values."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        elif p.dim() == 1:  # norm scales
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return module


def tiny_sd15_model(seed: int = 0, dtype=torch.float32, config=None):
    """A ModelPatcher around a tiny SD1.5-shaped U-Net (epsilon prediction) on the CPU."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(config or TINY_SD15)
    unet_config["dtype"] = dtype
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    initialise_seeded(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def text_conditioning(seed: int, tokens: int = 8, batch: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=generator), {}]]


def tiny_pipeline(model):
    """generate.Pipeline with deterministic stand-ins for CLIP Text Encode and the VAE (the U-Net is ``model``)."""
    import hashlib

    import torch.nn.functional as F

    from comfyui_dreamcache.dreamcache_core.generate import Pipeline

    class TinyPipeline(Pipeline):
        def encode_text(self, text):
            return text_conditioning(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))

        def encode_image(self, image):
            pooled = F.avg_pool2d(image[..., :3].permute(0, 3, 1, 2), 8)
            return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 2 - 1

        def decode(self, samples):
            return torch.sigmoid(F.interpolate(samples[:, :3], scale_factor=8, mode="nearest")).permute(0, 2, 3, 1)

    return TinyPipeline(model)


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
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(config or TINY_SDXL)
    unet_config["dtype"] = dtype
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    initialise_seeded(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sdxl_text_conditioning(seed: int, tokens: int = 8, batch: int = 1, size: int = 1024):
    """What CLIPTextEncode gives for SDXL: the token context plus pooled_output (and the size fields)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, TINY_SDXL["context_dim"], generator=generator)
    pooled = torch.randn(batch, SDXL_POOLED_DIM, generator=generator)
    return [[context, {"pooled_output": pooled, "width": size, "height": size, "target_width": size,
                       "target_height": size}]]
