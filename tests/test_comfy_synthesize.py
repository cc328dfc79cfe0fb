"""The synthetic training set through ComfyUI's real sampling code and transformers' real detection/segmentation.

Skipped (with the reason) when COMFYUI_PATH is unset. The render base is the tiny SD1.5-shaped U-Net with the
stand-in text encoder and VAE of ``tiny_models.tiny_pipeline``; Grounding-DINO and SAM are tiny random
transformers models saved into folders and loaded from there, as real ones are.
"""
import csv
import json
import math

import numpy as np
import pytest
import torch

from tiny_models import tiny_pipeline, tiny_sd15_model
from tiny_vision_models import write_tiny_grounding_dino, write_tiny_sam

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

SIDE = 64
CAPTIONS = [("a photo of a red ceramic mug on a table", "mug"), ("a blue glass vase on the beach", "vase"),
            ("a photo of a wooden toy robot in a forest", "toy robot"), ("a golden metal lamp on a desk", "lamp"),
            ("a pink felt hat on a bed", "hat")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    folder = tmp_path_factory.mktemp("synthesize_inputs")
    captions = folder / "captions.tsv"
    captions.write_text("".join(f"{c}\t{n}\n" for c, n in CAPTIONS))
    return {"pipeline": tiny_pipeline(tiny_sd15_model(seed=0)), "captions": str(captions),
            "detector": write_tiny_grounding_dino(folder / "grounding-dino", [n for _, n in CAPTIONS]),
            "sam": write_tiny_sam(folder / "sam"), "folder": folder}


def render_argv(setup, out, *extra):
    return ["--captions", setup["captions"], "--out", str(out), "--width", str(SIDE), "--height", str(SIDE),
            "--steps", "2", "--cfg", "3.5", "--seed", "7", "--shard-size", "3", "--reference-size", "32",
            "--quiet", *extra]


def read_rgb(path):
    from PIL import Image

    with Image.open(path) as handle:
        return np.asarray(handle.convert("RGB")).copy()


def test_targets_are_generates_images_and_batches_render_row_by_row(setup, tmp_path):
    """A target is pixel for pixel what `generate --guidance off` makes of its caption and seed; a batch of
    captions renders each as it would alone."""
    from comfyui_dreamcache.dreamcache_core.evaluation import generate
    from comfyui_dreamcache.dreamcache_core.masking.subject_filters import Detection
    from comfyui_dreamcache.dreamcache_core.training.synthesize import PipelineRenderer, run_synthesis

    def whole_centre(image, noun):
        mask = torch.zeros(image.shape[:2])
        mask[16:48, 16:48] = 1.0
        return Detection(mask, 0.9)

    summary = run_synthesis(render_argv(setup, tmp_path / "out"), pipeline=setup["pipeline"],
                            segmenter=whole_centre, log=lambda m: None)
    assert summary.kept == 5 and summary.rendered == 5
    caption, _ = CAPTIONS[3]
    generate.main(["--guidance", "off", "--prompt", caption, "--seed", "10", "--out", str(tmp_path / "gen"),
                   "--width", str(SIDE), "--height", str(SIDE), "--steps", "2", "--cfg", "3.5", "--quiet"],
                  pipeline=setup["pipeline"])
    row3 = tmp_path / "out" / "shard-00001" / "targets" / "00000003.png"  # row 3: seed 7 + 3, shard 3 // 3
    assert np.array_equal(read_rgb(row3), read_rgb(tmp_path / "gen" / "000_00.png"))

    renderer = PipelineRenderer(setup["pipeline"], SIDE, SIDE, steps=2, cfg=3.5)
    captions = [c for c, _ in CAPTIONS[:2]]
    together = renderer(captions, [1, 2])
    alone = torch.cat([renderer([c], [s]) for c, s in zip(captions, [1, 2])])
    assert together.shape == (2, SIDE, SIDE, 3)
    # the same up to float summation order in batched kernels (a swapped caption or seed differs by ~0.1)
    torch.testing.assert_close(together, alone, atol=5e-4, rtol=0)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # the captions were not mixed up


def test_grounded_sam_synthesis_trains_an_adapter_end_to_end(setup, tmp_path):
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.training.synthesize import PROGRESS_FILE, run_synthesis
    from comfyui_dreamcache.dreamcache_core.masking.text_segmenter import GroundedSam
    from comfyui_dreamcache.dreamcache_core.training.train import main as train
    from comfyui_dreamcache.dreamcache_core.io.image_files import load_image
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import (initialise_seeded, model_from_unet_config,
                                                                       save_unet_weights)

    out = tmp_path / "synthetic"
    argv = render_argv(setup, out, "--detector", setup["detector"], "--segmenter", setup["sam"], "--device", "cpu",
                       "--min-score", "0", "--min-mask-fraction", "0.01", "--max-mask-fraction", "0.99")
    summary = run_synthesis(argv, pipeline=setup["pipeline"], log=lambda m: None)
    assert summary.kept >= 2 and summary.index is not None, summary.text()
    index = json.loads((out / "index.json").read_text())
    assert index["images_kept"] == summary.kept and index["rows"] == summary.rows

    # what the progress log records is what the transformers models say about the saved target
    segmenter = GroundedSam(setup["detector"], setup["sam"], "cpu")
    records = [json.loads(line) for shard in ("shard-00000", "shard-00001")
               for line in (out / shard / PROGRESS_FILE).read_text().splitlines()]
    assert [r["number"] for r in records] == [0, 1, 2, 3, 4]
    for record in records:
        shard = f"shard-{record['number'] // 3:05d}"
        detection = segmenter(load_image(str(out / shard / "targets" / f"{record['id'][:8]}.png"), transparency="white"),
                              record["noun"])
        assert record["score"] == pytest.approx(detection.score, abs=1e-6) and 0.0 <= detection.score <= 1.0
        assert record["mask_fraction"] == pytest.approx(float((detection.mask >= 0.5).float().mean()), abs=1e-6)

    # the real path's filters: with a stricter whole-image bound exactly the rows above it are skipped, with reason
    strict = run_synthesis(render_argv(setup, tmp_path / "strict", "--detector", setup["detector"], "--segmenter",
                                       setup["sam"], "--device", "cpu", "--min-score", "0", "--min-mask-fraction",
                                       "0.01", "--max-mask-fraction", "0.5"), pipeline=setup["pipeline"],
                           log=lambda m: None)
    large = [r["id"] for r in records if r["mask_fraction"] > 0.5]
    assert dict(strict.skipped) == ({"whole-image mask": len(large)} if large else {})
    skipped = [line.split("\t")[0] for shard in ("shard-00000", "shard-00001")
               for line in (tmp_path / "strict" / shard / "skipped.txt").read_text().splitlines()]
    assert skipped == large

    # the trainer reads the sharded folder directly and trains a few steps
    weights, config = tmp_path / "unet.safetensors", tmp_path / "unet.json"
    model = model_from_unet_config(tw.toy_unet_config(context_dim=32), "eps", device="cpu",
                                   initialise=lambda unet: initialise_seeded(unet, 0))
    save_unet_weights(model, str(weights))
    config.write_text(json.dumps({"unet_config": tw.toy_unet_config(context_dim=32), "prediction": "eps"}))
    run = tmp_path / "run"
    assert train(["--unet-config", str(config), "--unet-weights", str(weights), "--cpu", "--toy-encoders",
                  "--data", str(out), "--resolution", "32", "--batch-size", "2", "--steps", "2", "--lr", "1e-3",
                  "--save-every", "0", "--no-progress", "--output-dir", str(run)]) == 0
    with open(run / "train_log.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    adapter = load_adapter(str(run / "dreamcache_adapter.safetensors"))
    assert adapter.parameter_count() > 0
