"""ComfyUI node "Load SAM Model (DreamCache)": a SAM checkpoint from models/sams.

Its output, SAM_MODEL, is a ``DreamCacheSamModel``: the segment-anything
model in a ComfyUI ModelPatcher whose load and offload devices come from the
device choice, so that ComfyUI's memory manager places it (load_models_gpu)
and the Mask Reference node can segment without knowing how it was loaded.  Other packs also use the
type name SAM_MODEL for a bare segment-anything ``Sam``; ``as_sam_model``
accepts those too.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ..dreamcache_core.masking.sam_segmenter import build_sam_from_state_dict, detect_sam_variant, load_sam_checkpoint, segment_subject
from .io_types import CATEGORY_LOADERS, SamModel
from .model_folders import SAM_FILE_EXTENSIONS, SAM_FOLDER

DEVICE_CHOICES = ["auto", "cpu", "gpu"]


def sam_checkpoint_names() -> list:
    """The checkpoint files in the ``sams`` folders (other files are left out)."""
    return [name for name in folder_paths.get_filename_list(SAM_FOLDER) if name.lower().endswith(SAM_FILE_EXTENSIONS)]


class SamHolder(torch.nn.Module):
    """The segment-anything ``Sam`` as the module a ModelPatcher manages (``Sam.device`` is a read-only property,
    and ComfyUI's patcher records the device on the module it loads)."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam


class DreamCacheSamModel:
    """A segment-anything model in a ComfyUI ModelPatcher, so that ComfyUI's memory manager places it.

    ``compute_device`` is the patcher's load device (where segmentation runs); ``storage_device`` its offload
    device (where ComfyUI moves it when the memory is needed, the CPU for "auto").
    """

    def __init__(self, sam, variant: str, compute_device: torch.device, storage_device: torch.device, name: str = ""):
        self.variant = variant
        self.compute_device = torch.device(compute_device)
        self.storage_device = torch.device(storage_device)
        self.name = name
        self.patcher = None if sam is None else comfy.model_patcher.ModelPatcher(
            SamHolder(sam), load_device=self.compute_device, offload_device=self.storage_device)

    @property
    def sam(self):
        return None if self.patcher is None else self.patcher.model.sam

    def __repr__(self) -> str:
        return f"DreamCacheSamModel({self.name or self.variant}, compute={self.compute_device}, storage={self.storage_device})"

    def segment(self, images_rgb: torch.Tensor) -> torch.Tensor:
        """Subject masks ``[B, H, W]`` (CPU float 0/1) for ``images_rgb`` ``[B, H, W, 3]``.

        ComfyUI's load_models_gpu puts the model on the compute device (freeing memory as for its own models),
        whole: SAM's plain torch layers cannot run partly offloaded as ComfyUI's cast layers can. The progress bar
        advances once per image.
        """
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        progress = comfy.utils.ProgressBar(len(images_rgb))
        masks = []
        for image in images_rgb:
            comfy.model_management.throw_exception_if_processing_interrupted()
            masks.append(segment_subject(self.sam, image))
            progress.update(1)
        return torch.stack(masks)


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

    auto: compute on ComfyUI's device, offloaded to its offload device (normally
    the CPU) when ComfyUI needs the memory; gpu: stay on ComfyUI's device; cpu:
    stay on the CPU.
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


class DreamCacheSAMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheSAMLoader",
            display_name="Load SAM Model (DreamCache)",
            category=CATEGORY_LOADERS,
            description="Loads a Segment Anything (SAM) model from models/sams. Connect it to Mask Reference to cut "
                        "the subject out of a reference photo without drawing a mask.",
            inputs=[
                io.Combo.Input("model_name", options=sam_checkpoint_names(),
                               tooltip="A Segment Anything checkpoint in ComfyUI/models/sams: sam_vit_b_01ec64.pth, "
                                       "sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth (or a .safetensors conversion). "
                                       "The variant is detected from the weights."),
                io.Combo.Input("device", options=DEVICE_CHOICES, default="auto",
                               tooltip="auto: segment on ComfyUI's device and let ComfyUI move the model back to RAM "
                                       "when sampling needs the VRAM. gpu: keep it on the GPU (faster when segmenting "
                                       "often). cpu: always on the CPU (slow, no VRAM)."),
            ],
            outputs=[SamModel.Output(display_name="sam_model", tooltip="The Segment Anything model, for Mask "
                                                                       "Reference to find the subject automatically.")],
        )

    @classmethod
    def execute(cls, model_name, device):
        path = folder_paths.get_full_path_or_raise(SAM_FOLDER, model_name)
        state_dict = load_sam_checkpoint(path)
        try:
            variant = detect_sam_variant(state_dict)
            sam = build_sam_from_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(f"'{model_name}': {error}") from error
        compute_device, storage_device = resolve_sam_devices(device)
        sam.to(storage_device)
        return io.NodeOutput(DreamCacheSamModel(sam, variant, compute_device, storage_device, name=model_name))


NODES = [DreamCacheSAMLoader]
