"""Model files with seeded random weights, in the formats users download, for the real-server tests.

- ``write_random_checkpoint``: a full SD1.5, SD2.1-base (512, epsilon) or SDXL checkpoint (U-Net, text encoders, VAE) with the real
  architecture, keyed as the original single-file checkpoints are, so that ComfyUI's stock
  CheckpointLoaderSimple detects and loads it as it would the real file. The key list and shapes come from
  ComfyUI's own modules built on the meta device (no memory), the values from a seeded generator per
  tensor, written tensor by tensor (an SDXL checkpoint is 7 GB in float16; it is never whole in memory).
- ``write_random_adapter``: a DreamCache adapter for that checkpoint's memory layers, randomised (not the
  identity), written with the pack's own writer.
- ``write_random_authors_adapter``: the same for SD2.1 in the authors' released format (a ``torch.save`` dict
  ``diffusion_model.<layer>.transformer_blocks.0.<attn_mem.* | norm2_mem.* | linear_cat.*>``, LN_m unfolded),
  what ``cross_attention-<step>.pt`` holds.
- ``write_random_sam``: a segment-anything ViT-B checkpoint (.pth) with seeded random weights.

Files are written once into a cache folder (``DREAMCACHE_TEST_MODELS``, default
~/.cache/comfyui-dreamcache/test-models) and reused: generating the SDXL file takes minutes.
"""
import json
import os
import struct
import zlib
from pathlib import Path

import torch

FORMAT_TAG = "v1"  # bump when the values written change, so stale cached files are not reused
DEFAULT_CACHE = Path.home() / ".cache" / "comfyui-dreamcache" / "test-models"

# ComfyUI's default SD VAE (comfy/sd.py) and the real U-Nets (the same configs the benchmark uses).
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def model_cache_folder() -> Path:
    folder = Path(os.environ.get("DREAMCACHE_TEST_MODELS", DEFAULT_CACHE))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def model_config_of(family: str):
    """ComfyUI's model config of the real ``family`` U-Net (the benchmark's configs; SD2.1 is SD1.5's layout with
    a 1024-wide text context, linear proj_in/out and heads of 64 channels), in float16."""
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import family_model_config
    from comfyui_dreamcache.dreamcache_core.evaluation.benchmark_shapes import SD15_UNET, SDXL_UNET

    sd21 = dict(SD15_UNET, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    return family_model_config(family, {"sd15": SD15_UNET, "sd21": sd21, "sdxl": SDXL_UNET}[family], torch.float16)


def checkpoint_layout(family: str) -> dict:
    """{checkpoint key: (shape, dtype)} of the original single-file checkpoint, from modules on the meta device."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = model_config_of(family)
    with torch.device("meta"):
        model = model_config.get_model({}, device=torch.device("meta"))
        target = model_config.clip_target()
        text_encoders = target.clip(dtype=torch.float16, device=torch.device("meta"), model_options={})
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    state = model.state_dict_for_saving(text_encoders.state_dict(), vae.state_dict())
    return {key: (tuple(value.shape), value.dtype) for key, value in state.items()}


def random_value(key: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded per key (order-independent): weights ~ N(0, 1/fan_in), norm scales ~ 1, biases small."""
    if not dtype.is_floating_point:
        if key.endswith("position_ids"):
            return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=generator)
    if len(shape) <= 1:
        is_scale = key.endswith("weight") or key.endswith("scale")
        values = 1.0 + 0.05 * values if is_scale else 0.02 * values
    else:
        values = values / max(1.0, float(torch.tensor(shape[1:]).prod())) ** 0.5
    return values.to(torch.float16 if dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype)


def write_streamed_safetensors(path: Path, layout: dict, make_tensor, metadata=None) -> None:
    """A .safetensors file written one tensor at a time (header first, offsets from the shapes)."""
    header, offset = {}, 0
    stored_dtype = {}
    for key, (shape, dtype) in layout.items():
        stored = torch.float16 if dtype.is_floating_point else dtype
        stored_dtype[key] = stored
        size = int(torch.tensor(shape).prod()) if shape else 1
        nbytes = size * torch.empty((), dtype=stored).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[stored], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_suffix(path.suffix + ".partial")
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, (shape, dtype) in layout.items():
            tensor = make_tensor(key, shape, dtype).to(stored_dtype[key]).contiguous()
            handle.write(tensor.numpy().tobytes())
    partial.replace(path)


def write_random_checkpoint(family: str, seed: int = 0) -> Path:
    """The cached random checkpoint of ``family`` ("sd15", "sd21" or "sdxl"), written on first use. An "sd21" file
    loads as SD2.1-base (epsilon): ComfyUI reads v prediction from a spread of output_blocks.11.1's norm1 bias
    above 0.09, and the random biases' is 0.02."""
    path = model_cache_folder() / f"random-{family}-{FORMAT_TAG}-seed{seed}.safetensors"
    if not path.is_file():
        layout = checkpoint_layout(family)
        write_streamed_safetensors(path, layout, lambda key, shape, dtype: random_value(key, shape, dtype, seed),
                                   metadata={"note": f"random {family} weights for ComfyUI-DreamCache tests"})
    return path


def write_random_adapter(family: str, seed: int = 0) -> Path:
    """A randomised DreamCache adapter for the memory layers of ``family``'s real U-Net."""
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    path = model_cache_folder() / f"random-dreamcache-{family}-{FORMAT_TAG}-seed{seed}.safetensors"
    if not path.is_file():
        with torch.device("meta"):
            unet = model_config_of(family).get_model({}, device=torch.device("meta")).diffusion_model
        adapter = build_adapter(discover_memory_layers(unet), model_signature(unet), seed=seed)
        adapter.randomize_(seed=seed, scale=0.5)
        partial = path.with_suffix(".partial.safetensors")
        save_adapter(adapter, str(partial))
        partial.replace(path)
    return path


def write_random_authors_adapter(seed: int = 0) -> Path:
    """A randomised SD2.1 adapter in the authors' released layout (``torch.save`` of a dict of float32 tensors,
    LN_m raw: the loader folds it against the model's norm1 when it is applied)."""
    from comfyui_dreamcache.dreamcache_core.io.authors_adapter_format import authors_state_dict
    from comfyui_dreamcache.dreamcache_core.method.adapter import DreamCacheAdapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers

    path = model_cache_folder() / f"random-dreamcache-authors-sd21-{FORMAT_TAG}-seed{seed}.pt"
    if not path.is_file():
        with torch.device("meta"):
            unet = model_config_of("sd21").get_model({}, device=torch.device("meta")).diffusion_model
        adapter = DreamCacheAdapter(discover_memory_layers(unet), norm_folded=False)
        adapter.randomize_(seed=seed, scale=0.5)
        state = authors_state_dict(adapter, norm1_by_key={})
        for key in state:  # raw LN_m near the identity, as a trained one is
            if key.endswith("norm2_mem.weight"):
                state[key] = 1.0 + 0.1 * state[key]
        partial = path.with_suffix(".partial")
        torch.save(state, str(partial))
        partial.replace(path)
    return path


def write_random_sam(seed: int = 0) -> Path:
    """A segment-anything ViT-B checkpoint (what sam_vit_b_01ec64.pth holds) with seeded random weights."""
    import segment_anything

    path = model_cache_folder() / f"random-sam-vit-b-{FORMAT_TAG}-seed{seed}.pth"
    if not path.is_file():
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            sam = segment_anything.sam_model_registry["vit_b"](checkpoint=None)
        finally:
            torch.random.set_rng_state(state)
        partial = path.with_suffix(".partial")
        torch.save({key: value.half() for key, value in sam.state_dict().items()}, str(partial))
        partial.replace(path)
    return path
