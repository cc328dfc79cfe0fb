"""ComfyUI model objects the pack makes (ComfyUI imported inside the functions).

* ``load_checkpoint``: a full SD1.x / SD2.x / SDXL checkpoint through ComfyUI's own loader
  (``comfy.sd.load_checkpoint_guess_config``), which also decides epsilon vs v prediction from the file, as
  the Load Checkpoint node does; returns the MODEL, CLIP and VAE.
* ``model_from_unet_config``: a U-Net built from a ComfyUI unet config (training from a config, the toy
  benchmark), SD1.5 latent format, epsilon or v prediction, weights from a .safetensors of its tensors.
* ``random_model``: an SD1.5- or SDXL-family model of any unet config with seeded random weights
  (``initialise_seeded``): the benchmarks' shapes and the tests' tiny models; ``meta_unet`` the same U-Net on
  the meta device (FLOP counts of shapes too large to build).
* ``adapter_model_patcher``: the adapter as a ModelPatcher for ComfyUI's memory manager.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype(name: Optional[str]):
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use auto, fp32, fp16 or bf16.")
    return DTYPES[name]


def load_checkpoint(path: str, unet_dtype: Optional[str] = None, need_encoders: bool = False):
    """(model_patcher, clip, vae) of a checkpoint file, through ComfyUI's loader (what Load Checkpoint does,
    textual-inversion embeddings from ComfyUI's embeddings folder included). ``need_encoders``: refuse a file
    without a text encoder or a VAE."""
    import comfy.sd
    import folder_paths

    if not os.path.isfile(path):
        raise ValueError(f"Checkpoint not found: {path}. Pass the .safetensors/.ckpt of an SD1.5, SD2.x or SDXL model.")
    model_options = {}
    dtype = _dtype(unet_dtype)
    if dtype is not None:
        model_options["dtype"] = dtype
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True, model_options=model_options,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings"))
    model, clip, vae = out[0], out[1], out[2]
    if model is None:
        raise ValueError(f"{path} holds no diffusion model.")
    if need_encoders and (clip is None or vae is None):
        raise ValueError(f"{os.path.basename(path)} holds no text encoder or no VAE; use a full checkpoint "
                         "(SD1.5, SD2.x or SDXL) such as the ones Load Checkpoint reads.")
    return model, clip, vae


def comfy_nodes_module():
    """ComfyUI's own ``nodes`` module (never this pack's ``nodes`` package): the stock nodes' code."""
    import importlib

    module = importlib.import_module("nodes")
    if not hasattr(module, "common_ksampler"):
        raise RuntimeError(f"'import nodes' found {getattr(module, '__file__', module)}, not ComfyUI's nodes.py. "
                           "Run from a folder that is not the pack's root, or pass --comfyui.")
    return module


def read_unet_config(path: str) -> tuple:
    """(unet_config, prediction) from a JSON file: a ComfyUI unet config, or {"unet_config": ..., "prediction": ...}."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if "unet_config" in data:
        return dict(data["unet_config"]), data.get("prediction", "eps")
    return dict(data), "eps"


def model_from_unet_config(unet_config: dict, prediction: str = "eps", weights: Optional[str] = None,
                           dtype=torch.float32, device=None, initialise=None):
    """A ModelPatcher around a U-Net built from ``unet_config`` (SD1.5 latent format).

    ``prediction`` is "eps" or "v"; ``weights`` a .safetensors of the U-Net's tensors (with or without the
    ``diffusion_model.`` prefix); without weights, ``initialise(unet)`` must fill them (ComfyUI skips init).
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(unet_config)
    config["dtype"] = dtype
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(dtype, None)
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}.get(prediction)
    if model_type is None:
        raise ValueError(f"Unknown prediction {prediction!r}; use eps or v.")
    load_device = torch.device(device) if device is not None else comfy.model_management.get_torch_device()
    base = comfy.model_base.BaseModel(model_config, model_type=model_type, device=torch.device("cpu"))
    unet = base.diffusion_model
    if weights:
        from safetensors.torch import load_file

        state = load_file(weights)
        state = {k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k: v for k, v in state.items()}
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit this unet config (missing {missing[:3]}..., unexpected "
                             f"{unexpected[:3]}...).")
    elif initialise is not None:
        initialise(unet)
    else:
        raise ValueError("A U-Net built from a config needs --unet-weights (ComfyUI leaves new weights uninitialised).")
    unet.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=torch.device("cpu"))


def save_unet_weights(model_patcher, path: str) -> None:
    from safetensors.torch import save_file

    unet = model_patcher.model.diffusion_model
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, path)


@torch.no_grad()
def initialise_seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's ops skip initialisation: give every parameter seeded values of a sensible scale.

    Matrices/convolutions get N(0, 1/fan_in), biases N(0, 0.02^2), 1-d scales 1 + N(0, 0.1^2).
    """
    generators = {}
    for name, p in module.named_parameters():
        device = p.device
        generator = generators.get(str(device))
        if generator is None:
            generator = generators[str(device)] = torch.Generator(device=device).manual_seed(seed)
        values = torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32)
        if name.endswith("bias"):
            values.mul_(0.02)
        elif p.dim() == 1:
            values.mul_(0.1).add_(1.0)
        else:
            values.div_(math.sqrt(p[0].numel()))
        p.copy_(values.to(p.dtype))
        del values
    return module


def family_model_config(family: str, unet_config: dict, dtype):
    """ComfyUI's model config (supported_models.SD15 / SD20 / SDXL) of ``family`` ("sd15", "sd21", "sdxl") for
    ``unet_config`` at ``dtype``."""
    import comfy.supported_models

    families = {"sd15": comfy.supported_models.SD15, "sd21": comfy.supported_models.SD20,
                "sdxl": comfy.supported_models.SDXL}
    if family not in families:
        raise ValueError(f"Unknown model family {family!r}; use one of {sorted(families)}.")
    model_config = families[family](dict(unet_config, dtype=dtype))
    model_config.set_inference_dtype(dtype, None)
    return model_config


def meta_unet(family: str, unet_config: dict):
    """``family``'s U-Net of ``unet_config`` on the meta device: shapes only, no memory (FLOP counting)."""
    return family_model_config(family, unet_config, torch.float32).get_model({}, device=torch.device("meta")).diffusion_model


def random_model(family: str, unet_config: dict, seed: int = 0, dtype=torch.float32, device=None):
    """A ModelPatcher around an SD1.5- ("sd15") or SDXL-family ("sdxl") U-Net built from ``unet_config`` with
    seeded random weights (``initialise_seeded``), loaded and kept on ``device`` (default the CPU)."""
    import comfy.model_patcher

    device = torch.device(device or "cpu")
    model = family_model_config(family, unet_config, dtype).get_model({}, device=device)
    initialise_seeded(model.diffusion_model, seed)
    model.diffusion_model.to(device=device, dtype=dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


ADAPTER_PATCHER_ATTRIBUTE = "_dreamcache_comfy_model_patcher"


def adapter_model_patcher(adapter: torch.nn.Module, extra_device_bytes: int = 0):
    """THE ComfyUI ModelPatcher of the adapter (one per adapter object, made on first use and kept on it), so
    that ComfyUI's memory manager loads it to the device with the model it patches and offloads it with it (as
    ComfyUI's own model patches are handed over). Its size is set to the adapter's weights plus
    ``extra_device_bytes`` (the memory keys/values sampling holds).

    One patcher per adapter, not one per Apply: ComfyUI's ``current_loaded_models`` keeps an entry per patcher
    it loaded, holding the patcher weakly and the adapter strongly through its module; a patcher that died while
    its adapter lives (a new one per re-queued Apply) left a dead entry there that neither ``free_memory`` nor
    ``unload_all_models`` removes. The patcher is kept on the adapter, so both live and die together."""
    import comfy.model_management
    import comfy.model_patcher

    size = comfy.model_management.module_size(adapter) + int(extra_device_bytes)
    patcher = adapter.__dict__.get(ADAPTER_PATCHER_ATTRIBUTE)
    if patcher is None or patcher.model is not adapter:
        patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device(),
                                                   size=size)
        adapter.__dict__[ADAPTER_PATCHER_ATTRIBUTE] = patcher  # a plain attribute, not a submodule
    patcher.size = size
    return patcher
