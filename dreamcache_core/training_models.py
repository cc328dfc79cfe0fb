"""Loading the frozen base model for training (ComfyUI imported inside the functions).

* ``load_checkpoint``: a full SD1.x / SD2.x / SDXL checkpoint through
  ComfyUI's own loader (``comfy.sd.load_checkpoint_guess_config``), which
  also decides epsilon vs v prediction from the file, as the Load Checkpoint
  node does; returns the MODEL, CLIP and VAE.
* ``model_from_unet_config``: a U-Net built from a ComfyUI unet config (tests,
  the toy benchmark), SD1.5 latent format, epsilon or v prediction, weights
  from a .safetensors file of ``diffusion_model`` tensors.
"""
from __future__ import annotations

import json
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


def load_checkpoint(path: str, unet_dtype: Optional[str] = None):
    """(model_patcher, clip, vae) of a checkpoint file, through ComfyUI's loader."""
    import comfy.sd

    if not os.path.isfile(path):
        raise ValueError(f"Checkpoint not found: {path}. Pass the .safetensors/.ckpt of an SD1.5, SD2.x or SDXL model.")
    model_options = {}
    dtype = _dtype(unet_dtype)
    if dtype is not None:
        model_options["dtype"] = dtype
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True, model_options=model_options)
    model, clip, vae = out[0], out[1], out[2]
    if model is None:
        raise ValueError(f"{path} holds no diffusion model.")
    return model, clip, vae


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
