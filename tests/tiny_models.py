"""Tiny SD-shaped ComfyUI models with seeded random weights (ComfyUI imported lazily)."""
import torch

from comfyui_dreamcache.dreamcache_core.evaluation.benchmark_shapes import SHAPES

# The benchmark's tiny shapes: the SD1.5 layout at width 32 (text width 64); SDXL's layout (no attention at the
# highest resolution, transformer depth 2, linear projections, adm = pooled + sizes) at width 32.
TINY_SD15 = dict(SHAPES["tiny"].unet)
CONTEXT_DIM = TINY_SD15["context_dim"]


def tiny_sd15_model(seed: int = 0, dtype=torch.float32, config=None):
    """A ModelPatcher around a tiny SD1.5-shaped U-Net (epsilon prediction) on the CPU, seeded weights."""
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import random_model

    return random_model("sd15", config or TINY_SD15, seed, dtype)


def text_conditioning(seed: int, tokens: int = 8, batch: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=generator), {}]]


def tiny_pipeline(model):
    """generate.Pipeline with deterministic stand-ins for CLIP Text Encode and the VAE (the U-Net is ``model``)."""
    import hashlib

    import torch.nn.functional as F

    from comfyui_dreamcache.dreamcache_core.evaluation.generate import Pipeline

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


TINY_SDXL = dict(SHAPES["tiny-sdxl"].unet)
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


def tiny_setup(family: str = "sd15", model_seed: int = 0, adapter_seed: int = 7) -> dict:
    """What the ComfyUI tests start from: a tiny model, its U-Net and memory layers, a fresh adapter (the exact
    identity) and a "trained" one (seeded random weights)."""
    from conftest import import_comfy

    import_comfy()
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    model = (tiny_sdxl_model if family == "sdxl" else tiny_sd15_model)(seed=model_seed)
    unet = model.model.diffusion_model
    specs = discover_memory_layers(unet)
    return {"model": model, "unet": unet, "specs": specs, "fresh": build_adapter(specs, model_signature(unet)),
            "trained": build_adapter(specs, model_signature(unet)).randomize_(seed=adapter_seed, scale=0.5)}


def tiny_setup_with_caches(references: int = 2, family: str = "sd15") -> dict:
    """``tiny_setup`` plus ``references`` one-reference caches (Encode DreamCache run as ComfyUI runs it, on seeded
    random latents) and a positive / negative text conditioning."""
    setup = tiny_setup(family)  # skips, saying why, without COMFYUI_PATH
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    from run_as_comfyui import run_node

    latents = torch.randn(references, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    caches = [run_node(DreamCacheEncode, setup["model"], {"samples": latents[i:i + 1]}, text_conditioning(0),
                       seed=0)[0] for i in range(references)]
    return dict(setup, caches=caches, positive=text_conditioning(1), negative=text_conditioning(2))
