"""Segment the subject named by a noun: Grounding-DINO boxes it, SAM cuts it out (transformers, local folders).

``GroundedSam(detector_dir, sam_dir)`` loads both from folders written by
``save_pretrained`` (e.g. local copies of IDEA-Research/grounding-dino-base and
facebook/sam-vit-base); nothing is downloaded. Called with an image [H, W, 3]
in 0..1 and the subject noun, it prompts the detector with "<noun>.", takes the
best-scoring box, prompts SAM with that box and keeps the mask SAM scores
highest. It returns a ``subject_filters.Detection`` (mask, score, box).

``AutomaticSam(checkpoint)`` is the fallback without a detector: the original
segment-anything model with the automatic central-salient-object prompt
(``sam_segmenter.segment_subject``); its detections carry no score.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .sam_segmenter import SamSegmenter
from .subject_filters import Detection

DETECTOR_TYPES = ("grounding-dino",)
SAM_TYPES = ("sam",)


def model_type_of(folder: str, what: str, option: str) -> str:
    """The ``model_type`` in ``folder``/config.json; ValueError saying what to pass when it is not a model folder."""
    config = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {folder} is not a folder; give the local folder of a {what} model "
                         "(written by save_pretrained, holding config.json and the weights).")
    if not os.path.isfile(config):
        raise ValueError(f"{option} {folder} holds no config.json, so it is not a transformers {what} folder; give the "
                         "folder written by save_pretrained (or a local copy of the model's hub repository).")
    with open(config, encoding="utf-8") as handle:
        return str(json.load(handle).get("model_type", ""))


def check_model_folder(folder: str, expected: tuple, what: str, option: str) -> None:
    found = model_type_of(folder, what, option)
    if found not in expected:
        raise ValueError(f"{option} {folder} holds a {found or 'unknown'!r} model, not a {what} "
                         f"(config.json model_type must be {' or '.join(expected)}).")


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image[..., :3].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


class GroundedSam:
    """Grounding-DINO + SAM from transformers folders: (image [H, W, 3], noun) -> Detection."""

    def __init__(self, detector_dir: str, sam_dir: str, device: Optional[str] = None):
        check_model_folder(detector_dir, DETECTOR_TYPES, "Grounding-DINO", "--detector")
        check_model_folder(sam_dir, SAM_TYPES, "SAM", "--segmenter")
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(detector_dir, local_files_only=True)
        self.detector_processor = AutoProcessor.from_pretrained(detector_dir, local_files_only=True)
        self.sam = SamModel.from_pretrained(sam_dir, local_files_only=True)
        self.sam_processor = SamProcessor.from_pretrained(sam_dir, local_files_only=True)
        self.detector.to(self.device).eval()
        self.sam.to(self.device).eval()

    @staticmethod
    def prompt(noun: str) -> str:
        return noun.strip().lower().rstrip(".") + "."

    @torch.no_grad()
    def detect(self, picture, noun: str):
        """(score, box) of the best box for ``noun``, or None when there is none."""
        inputs = self.detector_processor(images=picture, text=self.prompt(noun), return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        (found,) = self.detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0,
            target_sizes=[(picture.size[1], picture.size[0])])
        if found["scores"].numel() == 0:
            return None
        best = int(found["scores"].argmax())
        return float(found["scores"][best]), tuple(float(v) for v in found["boxes"][best].tolist())

    @torch.no_grad()
    def segment(self, picture, box: tuple) -> torch.Tensor:
        inputs = self.sam_processor(images=picture, input_boxes=[[list(box)]], return_tensors="pt").to(self.device)
        outputs = self.sam(**inputs, multimask_output=True)
        masks = self.sam_processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
        best = int(outputs.iou_scores[0, 0].argmax())
        return masks[0, best].float()

    def __call__(self, image: torch.Tensor, noun: str) -> Detection:
        picture = to_pil(image)
        found = self.detect(picture, noun)
        if found is None:
            return Detection(None)
        score, box = found
        return Detection(self.segment(picture, box), score, box)


class AutomaticSam:
    """segment-anything with the automatic prompt (no detector): (image, noun) -> Detection without a score."""

    def __init__(self, checkpoint: str, device: Optional[str] = None):
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--sam {checkpoint} is not a file; give a segment-anything checkpoint "
                             "(sam_vit_b_01ec64.pth, ...), or --detector and --segmenter folders.")
        self.segmenter = SamSegmenter(checkpoint, device)

    def __call__(self, image: torch.Tensor, noun: str) -> Detection:
        return Detection(self.segmenter(image))
