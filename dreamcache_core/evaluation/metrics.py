"""DreamBench metrics in plain torch (+ transformers for the embedding models).

* DINO: cosine similarity of the CLS token of DINO ViT-S/16 (``facebook/dino-vits16``) between a generated
  image and the real images of its subject.
* CLIP-I: cosine similarity of CLIP ViT-B/32 (``openai/clip-vit-base-patch32``) image embeddings (after the
  visual projection) between a generated image and the real images.
* CLIP-T: cosine similarity of the CLIP image embedding of a generated image and the CLIP text embedding
  (after the text projection) of its prompt. Plain cosine, NOT scaled: some papers report 100 x cos or
  CLIPScore's 2.5 x max(cos, 0); the DreamCache paper's ~0.30 is the plain cosine.
* MDINO / MCLIP-I: DINO / CLIP-I with the subject segmented in both images, background replaced by white
  (``composite_on_white``), so the background cannot raise or lower the score.

Per image the score against the real images is the mean over them of the cosine (DreamBooth's "average
pairwise cosine similarity"); a subject's score is the mean over its images, the overall score the mean over
all images (equal to the mean of subject means when every subject has as many images).

The models come from local folders in transformers format (``save_pretrained`` / a downloaded Hub snapshot:
config.json, weights, preprocessor_config.json, and for CLIP the tokenizer files). Nothing downloads:
every ``from_pretrained`` call passes ``local_files_only=True``.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

# The published DreamBench numbers of DreamCache, one reference image (Aiello et al., CVPR 2025, arXiv 2411.17786).
PAPER_NUMBERS = {
    "sd15": {"dino": 0.713, "clip_i": 0.810, "clip_t": 0.298},
    "sd21": {"dino": 0.767, "clip_i": 0.816, "clip_t": 0.301},
    "masked": {"mclip_i": 0.906, "mdino": 0.837},
}
METRIC_NAMES = ("dino", "clip_i", "clip_t", "mdino", "mclip_i")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "mdino": "MDINO", "mclip_i": "MCLIP-I"}


# ----------------------------------------------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------------------------------------------

def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Na, Nb] cosine similarities of the rows of ``a`` [Na, D] and ``b`` [Nb, D] (computed in float64)."""
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return a @ b.T


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] cosine of row i of ``a`` with row i of ``b``."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def mean_cosine_to_set(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[N] per generated image: mean cosine to every real image (DreamBooth's pairwise average)."""
    return cosine_matrix(generated, real).mean(dim=1)


def composite_on_white(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """images [B, H, W, 3] 0..1, masks [B or 1, h, w] (1 = subject; resized to the image) -> subject on white."""
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if tuple(masks.shape[-2:]) != tuple(images.shape[1:3]):
        masks = F.interpolate(masks[:, None].float(), size=tuple(images.shape[1:3]), mode="bilinear",
                              align_corners=False)[:, 0]
    m = masks.float().clamp(0, 1).unsqueeze(-1).to(images.device)
    return images[..., :3] * m + (1.0 - m)


def summarize(values: Iterable[float]) -> dict:
    """mean, standard deviation (population) and count of finite values."""
    data = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not data:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(data) / len(data)
    std = math.sqrt(sum((v - mean) ** 2 for v in data) / len(data))
    return {"mean": mean, "std": std, "n": len(data)}


def aggregate(records: Sequence[dict], metrics: Sequence[str] = METRIC_NAMES) -> dict:
    """Per-subject and overall means of per-image scores. records: dicts with 'subject' and metric values."""
    subjects: dict = {}
    for record in records:
        subjects.setdefault(record.get("subject") or "", []).append(record)
    out = {"subjects": {}, "overall": {}}
    for name, items in subjects.items():
        out["subjects"][name] = {m: summarize(r.get(m) for r in items) for m in metrics}
        out["subjects"][name]["images"] = len(items)
    out["overall"] = {m: summarize(r.get(m) for r in records) for m in metrics}
    out["overall"]["images"] = len(records)
    out["overall"]["subject_mean"] = {
        m: summarize(v[m]["mean"] for v in out["subjects"].values()) for m in metrics}
    return out


# ----------------------------------------------------------------------------------------------------------------
# embedding models (transformers, local folders only)
# ----------------------------------------------------------------------------------------------------------------

def _check_folder(folder: str, what: str) -> None:
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"The {what} model folder '{folder}' does not exist. Download the model once (e.g. "
                         f"`huggingface-cli download {'facebook/dino-vits16' if what == 'DINO' else 'openai/clip-vit-base-patch32'}"
                         f" --local-dir <folder>`) and pass that folder; nothing is downloaded at run time.")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} has no config.json: it is not a transformers model folder ({what}).")
    if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        raise ValueError(f"{folder} has no preprocessor_config.json: save the model's image processor there too "
                         f"({what}).")


def _pixel_inputs(processor, images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] float 0..1 -> the processor's pixel_values (its own resize, crop and normalisation)."""
    batch = [image[..., :3].permute(2, 0, 1).float().cpu().clamp(0, 1) for image in images]
    return processor(images=batch, return_tensors="pt", do_rescale=False)["pixel_values"]


class DinoEmbedder:
    """CLS embeddings of a DINO ViT (transformers ``ViTModel``) from a local folder."""

    def __init__(self, folder: str, device=None, batch_size: int = 16):
        from transformers import AutoImageProcessor, ViTModel

        _check_folder(folder, "DINO")
        self.folder = folder
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.device, self.model.dtype))
        return out.last_hidden_state[:, 0].float().cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D] CLS embeddings of IMAGE [B, H, W, 3]."""
        chunks = [self.embed_pixels(_pixel_inputs(self.processor, images[i:i + self.batch_size]))
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks)


class ClipEmbedder:
    """Projected CLIP image and text embeddings (transformers ``CLIPModel``) from a local folder."""

    def __init__(self, folder: str, device=None, batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        _check_folder(folder, "CLIP")
        self.folder = folder
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """visual_projection(vision pooler output): what ``get_image_features`` returns."""
        vision = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.model.dtype))
        return self.model.visual_projection(vision.pooler_output).float().cpu()

    @torch.no_grad()
    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text_projection(text pooler output): what ``get_text_features`` returns."""
        text = self.model.text_model(input_ids=input_ids.to(self.device),
                                     attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        return self.model.text_projection(text.pooler_output).float().cpu()

    def images(self, images: torch.Tensor) -> torch.Tensor:
        chunks = [self.embed_pixels(_pixel_inputs(self.processor, images[i:i + self.batch_size]))
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return self.embed_tokens(tokens["input_ids"], tokens.get("attention_mask"))


# ----------------------------------------------------------------------------------------------------------------
# the metrics of one subject
# ----------------------------------------------------------------------------------------------------------------

def score_subject(generated: torch.Tensor, prompts: Sequence[str], real: torch.Tensor,
                  dino: Optional[DinoEmbedder] = None, clip: Optional[ClipEmbedder] = None,
                  generated_masks: Optional[torch.Tensor] = None, real_masks: Optional[torch.Tensor] = None) -> list:
    """Per generated image: {'dino', 'clip_i', 'clip_t', 'mdino', 'mclip_i'} (those the inputs allow).

    generated [N, H, W, 3], real [M, H', W', 3] (IMAGE tensors, any sizes: each is processed separately when
    sizes differ), prompts [N]; masks [N] / [M] of [H, W] (1 = subject) for the masked metrics.
    """
    n = len(generated)
    if len(prompts) != n:
        raise ValueError(f"{n} generated images but {len(prompts)} prompts.")
    scores = [dict() for _ in range(n)]

    def put(name, values):
        for score, value in zip(scores, values.tolist()):
            score[name] = float(value)

    masked = generated_masks is not None and real_masks is not None
    if masked:
        generated_white = _per_image(generated, generated_masks)
        real_white = _per_image(real, real_masks)
    if dino is not None:
        put("dino", mean_cosine_to_set(_embed(dino, generated), _embed(dino, real)))
        if masked:
            put("mdino", mean_cosine_to_set(_embed(dino, generated_white), _embed(dino, real_white)))
    if clip is not None:
        generated_clip = _embed(clip.images, generated)
        put("clip_i", mean_cosine_to_set(generated_clip, _embed(clip.images, real)))
        put("clip_t", rowwise_cosine(generated_clip, clip.texts(prompts)))
        if masked:
            put("mclip_i", mean_cosine_to_set(_embed(clip.images, generated_white), _embed(clip.images, real_white)))
    return scores


def _per_image(images, masks):
    """composite_on_white for a list or batch of images of possibly different sizes."""
    return [composite_on_white(image[None], mask[None] if mask.dim() == 2 else mask)[0]
            for image, mask in zip(images, masks)]


def _embed(embedder, images) -> torch.Tensor:
    """Embed a batch tensor, or a list of [H, W, 3] images of different sizes (one at a time)."""
    if isinstance(images, torch.Tensor):
        return embedder(images)
    same = len({tuple(i.shape) for i in images}) == 1
    if same:
        return embedder(torch.stack(list(images)))
    return torch.cat([embedder(image[None]) for image in images])
