"""ComfyUI node "Load SAM Model (DreamCache)": a SAM checkpoint from models/sams.

Its output, SAM_MODEL, is a ``DreamCacheSamModel``: the segment-anything
model plus the devices it computes and waits on, so that the Mask Reference
node can segment without knowing how it was loaded.  Other packs also use the
type name SAM_MODEL for a bare segment-anything ``Sam``; ``as_sam_model``
accepts those too.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import folder_paths

from ..dreamcache_core.sam_segmenter import build_sam_from_state_dict, detect_sam_variant, load_sam_checkpoint, segment_subject
from .model_folders import SAM_FILE_EXTENSIONS, SAM_FOLDER

DEVICE_CHOICES = ["auto", "cpu", "gpu"]


def sam_checkpoint_names() -> list:
    """The checkpoint files in the ``sams`` folders (other files are left out)."""
    return [name for name in folder_paths.get_filename_list(SAM_FOLDER) if name.lower().endswith(SAM_FILE_EXTENSIONS)]


class DreamCacheSamModel:
    """A segment-anything model and where it runs.

    ``compute_device`` is where segmentation runs; ``storage_device`` is where
    the model waits between runs (the CPU for "auto", so it holds no VRAM
    while the diffusion model samples).
    """

    def __init__(self, sam, variant: str, compute_device: torch.device, storage_device: torch.device, name: str = ""):
        self.sam = sam
        self.variant = variant
        self.compute_device = torch.device(compute_device)
        self.storage_device = torch.device(storage_device)
        self.name = name

    def __repr__(self) -> str:
        return f"DreamCacheSamModel({self.name or self.variant}, compute={self.compute_device}, storage={self.storage_device})"

    def segment(self, images_rgb: torch.Tensor) -> torch.Tensor:
        """Subject masks ``[B, H, W]`` (CPU float 0/1) for ``images_rgb`` ``[B, H, W, 3]``.

        Moves the model to the compute device for the batch and back.
        """
        moved = self.storage_device != self.compute_device
        if moved:
            comfy.model_management.free_memory(comfy.model_management.module_size(self.sam) * 1.5, self.compute_device)
            self.sam.to(self.compute_device)
        try:
            masks = []
            for image in images_rgb:
                comfy.model_management.throw_exception_if_processing_interrupted()
                masks.append(segment_subject(self.sam, image))
            return torch.stack(masks)
        finally:
            if moved:
                self.sam.to(self.storage_device)
                comfy.model_management.soft_empty_cache()


def as_sam_model(sam_model) -> DreamCacheSamModel:
    """Accept this pack's SAM_MODEL or another pack's bare segment-anything ``Sam``."""
    if isinstance(sam_model, DreamCacheSamModel):
        return sam_model
    if isinstance(sam_model, torch.nn.Module) and all(
        hasattr(sam_model, part) for part in ("image_encoder", "prompt_encoder", "mask_decoder")
    ):
        device = next(sam_model.parameters()).device
        return DreamCacheSamModel(sam_model, "unknown", device, device, name=type(sam_model).__name__)
    raise ValueError(
        f"The sam_model input got a {type(sam_model).__name__}, which is not a Segment Anything model. "
        "Connect 'Load SAM Model (DreamCache)'."
    )


def resolve_sam_devices(device_choice: str):
    """``(compute_device, storage_device)`` for the loader's device choice.

    auto: compute on ComfyUI's device, wait on its offload device (normally
    the CPU); gpu: stay on ComfyUI's device; cpu: stay on the CPU.
    """
    torch_device = comfy.model_management.get_torch_device()
    cpu = torch.device("cpu")
    if device_choice == "cpu":
        return cpu, cpu
    if device_choice == "gpu":
        if comfy.model_management.is_device_cpu(torch_device):
            logging.warning("Load SAM Model (DreamCache): no GPU is available to ComfyUI, SAM runs on the CPU.")
        return torch_device, torch_device
    if device_choice == "auto":
        return torch_device, comfy.model_management.unet_offload_device()
    raise ValueError(f"Unknown device '{device_choice}'; choose one of {DEVICE_CHOICES}.")


class DreamCacheSAMLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (sam_checkpoint_names(), {
                    "tooltip": "A Segment Anything checkpoint in ComfyUI/models/sams: sam_vit_b_01ec64.pth, "
                               "sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth (or a .safetensors conversion). "
                               "The variant is detected from the weights.",
                }),
                "device": (DEVICE_CHOICES, {
                    "default": "auto",
                    "tooltip": "auto: segment on ComfyUI's device and keep the model in RAM in between (frees VRAM "
                               "for sampling). gpu: keep it on the GPU (faster when segmenting often). cpu: always "
                               "on the CPU (slow, no VRAM).",
                }),
            }
        }

    RETURN_TYPES = ("SAM_MODEL",)
    RETURN_NAMES = ("sam_model",)
    OUTPUT_TOOLTIPS = ("The Segment Anything model, for Mask Reference to find the subject automatically.",)
    FUNCTION = "load_sam"
    CATEGORY = "DreamCache"
    DESCRIPTION = (
        "Loads a Segment Anything (SAM) model from models/sams. Connect it to Mask Reference to cut the subject "
        "out of a reference photo without drawing a mask."
    )

    def load_sam(self, model_name, device):
        path = folder_paths.get_full_path_or_raise(SAM_FOLDER, model_name)
        state_dict = load_sam_checkpoint(path)
        try:
            variant = detect_sam_variant(state_dict)
            sam = build_sam_from_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(f"'{model_name}': {error}") from error
        compute_device, storage_device = resolve_sam_devices(device)
        sam.to(storage_device)
        return (DreamCacheSamModel(sam, variant, compute_device, storage_device, name=model_name),)



NODE_CLASS_MAPPINGS = {"DreamCacheSAMLoader": DreamCacheSAMLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheSAMLoader": "Load SAM Model (DreamCache)"}
