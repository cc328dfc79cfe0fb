"""ComfyUI node "Mask Reference": the subject of a photo, centred on a white square.

DreamCache caches masked references (subject on white, no background).  The
subject is taken, in this order of preference, from the ``mask`` input, from
the image's own transparency (an RGBA image), or from SAM.
"""
from __future__ import annotations

import logging

import comfy.model_management
from comfy_api.v0_0_2 import io

from ..dreamcache_core.masking.reference_mask import (
    CROP_POSITIONS,
    DEFAULT_CROP_POSITION,
    DEFAULT_MARGIN,
    as_mask_batch,
    check_crop_position,
    cut_subjects_on_white,
    image_alpha,
    image_to_rgb,
    mask_is_empty,
)
from ..dreamcache_core.method.input_checks import check_finite_tensor
from .io_types import CATEGORY_REFERENCE, SamModel
from .sam_loader import as_sam_model
from .widget_checks import check_number_inputs, text_problem, validation_result


def warn_if_mask_looks_inverted(masks) -> None:
    """Log a warning when a mask is white all along its border but not everywhere:
    it probably marks the background (e.g. Load Image's MASK of a cut-out PNG)."""
    for index, mask in enumerate(masks):
        border = [mask[0], mask[-1], mask[:, 0], mask[:, -1]]
        if all(float(edge.min()) >= 0.5 for edge in border) and float(mask.min()) < 0.5:
            logging.warning(
                "Mask Reference: mask %d is white all along the image border, so it probably marks the background, "
                "not the subject. If the output shows the background, put an Invert Mask node before Mask Reference.",
                index + 1,
            )


class DreamCacheMaskReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheMaskReference",
            display_name="Mask Reference",
            category=CATEGORY_REFERENCE,
            description="Cuts the subject out of a reference photo and centres it on a white square, as DreamCache "
                        "expects: no background may leak into the cached features. The subject comes from the mask "
                        "input if connected, else from the image's transparency (RGBA), else from the SAM model.",
            inputs=[
                io.Image.Input("image", tooltip="The reference photo(s) of the subject. Each image of a batch is cut "
                                                "out with its own mask; a single mask is used for every image."),
                io.Int.Input("size", default=512, min=64, max=2048, step=8,
                             tooltip="Side of the square output in pixels. Use the base model's resolution (512 for "
                                     "SD1.5 / SD2.1-base)."),
                SamModel.Input("sam_model", optional=True,
                               tooltip="Finds the subject automatically (the most salient object near the centre) "
                                       "when no mask is connected. Ignored when a mask is connected."),
                io.Mask.Input("mask", optional=True,
                              tooltip="White (1) marks the subject. Resized to the image when sizes differ. Note: Load "
                                      "Image's MASK output is white where the PNG is transparent; for a cut-out PNG "
                                      "that is the background: put an Invert Mask node in between."),
                io.Combo.Input("crop_position", options=list(CROP_POSITIONS), default=DEFAULT_CROP_POSITION,
                               optional=True,
                               tooltip="How a subject that is not square fills the square. pad: the whole subject "
                                       "fits, white on its short side. center: the subject fills the square and the "
                                       "middle of its long side is kept (the ends are cut off). top / bottom: keep "
                                       "that end of a tall subject; left / right: keep that end of a wide subject. "
                                       "A direction that does not apply (top or bottom on a wide subject, left or "
                                       "right on a tall one) cuts both ends evenly, as center does."),
            ],
            outputs=[
                io.Image.Output(display_name="image",
                                tooltip="The subject centred on a white size x size square with a 10 % margin "
                                        "(cropped as crop_position says): the reference for Encode DreamCache "
                                        "(through VAE Encode)."),
                io.Mask.Output(display_name="mask", tooltip="The subject's mask on the same square, with the same "
                                                            "crop (white = subject)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, crop_position=None):
        """Checked when the prompt is queued: ComfyUI does not check a V3 combo's value against its options
        (a linked value is checked when the node runs)."""
        return validation_result([text_problem(check_crop_position, crop_position, "crop_position")])

    @classmethod
    def execute(cls, image, size, sam_model=None, mask=None, crop_position=DEFAULT_CROP_POSITION):
        check_number_inputs(cls, {"size": size})  # a linked size skips ComfyUI's queue-time min/max
        crop_position = check_crop_position(DEFAULT_CROP_POSITION if crop_position is None else crop_position)
        if image.ndim == 3:
            image = image.unsqueeze(0)
        check_finite_tensor(image, "The Mask Reference image", "Check the node that made it (a NaN pixel spreads to "
                            "the whole reference and the picture).")
        if mask is not None:
            check_finite_tensor(mask, "The Mask Reference mask", "Give a mask with values in 0..1.")
        transparency = image_alpha(image)
        if mask is not None:
            subject_masks = as_mask_batch(mask)
            warn_if_mask_looks_inverted(subject_masks)
        elif transparency is not None:
            subject_masks = transparency
        elif sam_model is not None:
            subject_masks = cls.segment_with_sam(as_sam_model(sam_model), image_to_rgb(image))
        else:
            raise ValueError(
                "Mask Reference needs to know where the subject is: connect a mask (white = subject, e.g. drawn "
                "with Load Image > Open in MaskEditor) or a SAM model (Load SAM Model (DreamCache)), or give an "
                "image with a transparent background."
            )
        reference, reference_mask = cut_subjects_on_white(image, subject_masks, size, DEFAULT_MARGIN, crop_position)
        device = comfy.model_management.intermediate_device()
        return io.NodeOutput(reference.to(device), reference_mask.to(device))

    @staticmethod
    def segment_with_sam(sam_model, images_rgb):
        masks = sam_model.segment(images_rgb)
        for index, mask in enumerate(masks):
            if mask_is_empty(mask):
                raise ValueError(
                    f"SAM found no subject in image {index + 1} of {len(masks)}. Connect a mask drawn by hand "
                    "instead, or use a photo in which the subject is near the centre and stands out from the "
                    "background."
                )
        return masks


NODES = [DreamCacheMaskReference]
