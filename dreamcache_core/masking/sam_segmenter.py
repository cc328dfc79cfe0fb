"""Segment Anything (SAM) for cutting out a reference subject.

Plain torch around the ``segment-anything`` package (imported lazily, inside
the functions that need it, so the rest of the pack works without it):

* ``load_sam_checkpoint(path)`` reads a checkpoint safely (safetensors, or
  ``torch.load(..., weights_only=True)``);
* ``detect_sam_variant(state_dict)`` tells ViT-B / ViT-L / ViT-H apart from
  the weight shapes, and explains what else the file is when it is not SAM;
* ``build_sam_from_state_dict(state_dict)`` builds the model with
  segment-anything's registry builder and loads the weights strictly;
* ``segment_subject(sam, image)`` returns the subject mask, prompting SAM with
  a user box or with the automatic central-salient-object prompt from
  ``reference_mask``;
* ``SamSegmenter(checkpoint, device)`` is SAM loaded once from a file, called
  with an image for its subject mask (the dataset builder, generation,
  evaluation and synthesis's automatic segmenter all use it).

Only the original SAM (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
``sam_vit_h_4b8939.pth`` or their safetensors conversions) is supported.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from .reference_mask import Box, find_salient_subject, image_to_rgb, pick_best_mask

#: Image encoder width -> (variant, number of transformer blocks).
SAM_VARIANTS_BY_WIDTH = {
    768: ("vit_b", 12),
    1024: ("vit_l", 24),
    1280: ("vit_h", 32),
}
#: The key whose shape names the variant (``[width, 3, 16, 16]``).
PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"
#: Buffers segment-anything's ``Sam`` keeps out of its state dict.
_NON_PERSISTENT_BUFFERS = {
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}
_SUPPORTED_FILES = (
    "an original Segment Anything checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
    "sam_vit_h_4b8939.pth, or a .safetensors conversion of one)"
)


# --------------------------------------------------------------------------
# Reading and recognising checkpoints
# --------------------------------------------------------------------------

def load_sam_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Read a SAM checkpoint into a CPU state dict, never unpickling code.

    ``.safetensors``/``.sft`` files are read with safetensors; anything else
    with ``torch.load(..., weights_only=True)``.  A ``{"model": ...}`` or
    ``{"state_dict": ...}`` wrapper is unwrapped.  Raises ValueError saying
    what is wrong with a corrupt, truncated or unsafe file.
    """
    name = os.path.basename(path)
    if path.lower().endswith((".safetensors", ".sft")):
        import safetensors.torch
        try:
            loaded = safetensors.torch.load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"'{name}' could not be read as a safetensors file ({error}). The file is corrupt, truncated "
                f"or not a safetensors file: download it again, or use {_SUPPORTED_FILES}."
            ) from error
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, zip errors, EOF, ...
            unsafe_object = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
            if unsafe_object:
                reason = (f"it contains Python objects ({unsafe_object.group(1)}), which are not loaded, for safety "
                          "(only plain tensors are)")
            else:
                reason = f"it is corrupt, truncated or not a PyTorch checkpoint ({type(error).__name__})"
            raise ValueError(f"'{name}' could not be loaded: {reason}. Use {_SUPPORTED_FILES}.") from error

    for wrapper_key in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and wrapper_key in loaded and isinstance(loaded[wrapper_key], Mapping):
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, Mapping) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"'{name}' does not hold a dictionary of weights. Use {_SUPPORTED_FILES}.")
    return dict(loaded)


def _find_prefix(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The prefix before ``image_encoder.patch_embed.proj.weight`` ('' when none), or None if absent."""
    for key in state_dict:
        if key.endswith(PATCH_EMBED_KEY):
            return key[: -len(PATCH_EMBED_KEY)]
    return None


def _what_else_it_is(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A guess at what a non-SAM state dict is, for the error message."""
    keys = list(state_dict)
    if any("image_encoder.trunk." in key for key in keys) or any(key.startswith("sam_mask_decoder.") for key in keys):
        return "This looks like a SAM 2 checkpoint, which this node does not support."
    if any("image_encoder.layers." in key for key in keys) or any("patch_embed.seq." in key for key in keys):
        return "This looks like a MobileSAM / EfficientSAM checkpoint, which this node does not support."
    if any("model.diffusion_model." in key or key.startswith("diffusion_model.") for key in keys):
        return "This looks like a diffusion model checkpoint, not a SAM one."
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"It has no '{PATCH_EMBED_KEY}' weight (its first keys: {sample or 'none'})."


def strip_sam_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop a common key prefix (e.g. ``model.``) in front of SAM's own key names."""
    prefix = _find_prefix(state_dict)
    if not prefix:
        return dict(state_dict)
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state_dict.items()}


def detect_sam_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"vit_b"``, ``"vit_l"`` or ``"vit_h"``, from the image encoder's width and depth.

    The width is the output channel count of
    ``image_encoder.patch_embed.proj.weight`` (768 / 1024 / 1280); the number
    of ``image_encoder.blocks.N`` must agree (12 / 24 / 32).  Raises
    ValueError, saying what the file seems to be, for anything else.
    """
    prefix = _find_prefix(state_dict)
    if prefix is None:
        raise ValueError(f"This is not a Segment Anything (SAM) checkpoint. {_what_else_it_is(state_dict)} "
                         f"Use {_SUPPORTED_FILES}.")
    if any(key.startswith(prefix + "mask_decoder.hf_token") for key in state_dict):
        raise ValueError(f"This looks like an HQ-SAM checkpoint, which this node does not support. Use {_SUPPORTED_FILES}.")
    width = int(state_dict[prefix + PATCH_EMBED_KEY].shape[0])
    if width not in SAM_VARIANTS_BY_WIDTH:
        raise ValueError(
            f"This SAM checkpoint's image encoder is {width} channels wide; only ViT-B (768), ViT-L (1024) "
            f"and ViT-H (1280) are supported. Use {_SUPPORTED_FILES}."
        )
    variant, expected_blocks = SAM_VARIANTS_BY_WIDTH[width]
    block_prefix = prefix + "image_encoder.blocks."
    block_numbers = {key[len(block_prefix):].split(".", 1)[0] for key in state_dict if key.startswith(block_prefix)}
    if len(block_numbers) != expected_blocks:
        raise ValueError(
            f"This checkpoint has a {width}-wide SAM image encoder ({variant}) but {len(block_numbers)} "
            f"transformer blocks instead of {expected_blocks}; it is not an original SAM model. Use {_SUPPORTED_FILES}."
        )
    return variant


# --------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------

def build_sam_from_state_dict(state_dict: Mapping[str, torch.Tensor]):
    """Build segment-anything's ``Sam`` for ``state_dict`` and load it strictly.

    The variant comes from ``detect_sam_variant``.  The model is built by the
    registry builder (``checkpoint=None``) on the meta device and takes over
    the state dict's tensors (converted to float32) with
    ``load_state_dict(strict=True, assign=True)``, so nothing is randomly
    initialised and no second copy of the weights is made.  Returns the model
    on the CPU, in eval mode, without gradients.
    """
    try:
        from segment_anything import sam_model_registry
    except ImportError as error:
        raise ImportError(
            "The 'segment-anything' package is needed to use SAM: install the pack's requirements "
            "(pip install segment-anything) in ComfyUI's Python environment."
        ) from error

    variant = detect_sam_variant(state_dict)
    weights = {key: value.to(device="cpu", dtype=torch.float32) for key, value in strip_sam_prefix(state_dict).items()}
    with torch.device("meta"):
        model = sam_model_registry[variant](checkpoint=None)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"This checkpoint looks like SAM {variant} but its weights do not fit segment-anything's {variant} "
            f"model ({str(error).splitlines()[0][:300]}...). Use {_SUPPORTED_FILES}."
        ) from error

    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if name not in _NON_PERSISTENT_BUFFERS:
                # An unknown segment-anything version: build it the slow, plain way.
                model = sam_model_registry[variant](checkpoint=None)
                model.load_state_dict(weights, strict=True)
                break
            model.register_buffer(name, torch.tensor(_NON_PERSISTENT_BUFFERS[name]).view(-1, 1, 1), persistent=False)
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------

def _as_float_rgb(image) -> torch.Tensor:
    """``[H, W, C]`` float 0..1 tensor/array or uint8 array -> ``[H, W, 3]`` float CPU tensor (a view when possible)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if image.ndim != 3:
        raise ValueError(f"Expected one image shaped [height, width, channels], got shape {tuple(image.shape)}.")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image_to_rgb(image.detach().cpu().float())


def _to_uint8(image_rgb: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` float 0..1 -> uint8 array, with a single float temporary."""
    scaled = image_rgb.clamp(0.0, 1.0)
    return scaled.mul_(255.0).round_().to(torch.uint8).numpy()


def segment_subject(sam_model, image, box: Optional[Tuple[float, float, float, float]] = None) -> torch.Tensor:
    """The subject mask of one image, ``[H, W]`` float32 of 0/1, on the CPU.

    Args:
        sam_model: segment-anything's ``Sam`` (runs on whatever device it is on).
        image: ``[H, W, C]`` float 0..1 (tensor or array) or uint8 array.
        box: optional ``(x0, y0, x1, y1)`` around the subject, in pixels.

    Without a box the prompt is automatic: ``find_salient_subject``'s box and
    a positive point on the subject.  SAM returns three candidate masks
    (``multimask_output``); ``pick_best_mask`` chooses among them.  The mask
    may be empty when SAM finds nothing; the caller decides what to do.
    """
    from segment_anything import SamPredictor

    image_rgb = _as_float_rgb(image)
    height, width = image_rgb.shape[:2]
    if box is None:
        prompt = find_salient_subject(image_rgb)
        box_xyxy = prompt.box.xyxy
        point_coords = np.array([prompt.point], dtype=np.float32)
        point_labels = np.array([1], dtype=np.int64)
    else:
        box_xyxy = Box(*[int(round(value)) for value in box]).xyxy
        point_coords, point_labels = None, None

    predictor = SamPredictor(sam_model)
    with torch.inference_mode():
        predictor.set_image(_to_uint8(image_rgb), image_format="RGB")
        masks, scores, _low_res_logits = predictor.predict(
            point_coords=point_coords,
            point_labels=point_labels,
            box=box_xyxy,
            multimask_output=True,
        )
    best = pick_best_mask(masks, scores, (height, width))
    return torch.from_numpy(np.ascontiguousarray(masks[best])).float()


class SamSegmenter:
    """SAM loaded once from a checkpoint file (``load_sam_checkpoint`` + ``build_sam_from_state_dict``), moved to
    ``device`` (default: CUDA when available); called with one image [H, W, C], returns ``segment_subject``'s
    subject mask [H, W]."""

    def __init__(self, checkpoint: str, device: Optional[str] = None):
        self.checkpoint = checkpoint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.sam = build_sam_from_state_dict(load_sam_checkpoint(checkpoint)).to(self.device)

    def __call__(self, image) -> torch.Tensor:
        return segment_subject(self.sam, image)
