"""What a training run reports: TensorBoard, per-band losses, validation grids, the held-out reference gap,
and the memory-lean optimizer; on a tiny SD-shaped U-Net and toy data through ComfyUI's real code.

Skipped (with the reason) when COMFYUI_PATH is unset.
"""
import csv
import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

N_SAMPLES = 6
TOY_CONTEXT = 32
SIDE = 32  # toy images: 32 px, 8x8 latents


def write_toy_manifest(root, salt, count):
    from comfyui_dreamcache.dreamcache_core.io.image_files import save_png
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.training.sample_draws import generator_for
    from comfyui_dreamcache.dreamcache_core.training.training_manifest import write_manifest

    train, held_out = tw.split_subjects()
    subjects = train if salt == "train" else held_out
    rows = []
    for i in range(count):
        subject = subjects[(i * 7) % len(subjects)]
        generator = generator_for("test-observability", salt, i)
        image, mask = tw.render(subject, generator)
        reference, reference_mask = tw.make_reference(image, mask, generator)
        save_png(image, str(root / f"{salt}{i}.png"), quantize="round")
        save_png(reference, str(root / f"{salt}{i}_ref.png"), quantize="round")
        save_png(reference_mask, str(root / f"{salt}{i}_ref_mask.png"), quantize="round")
        rows.append({"target": f"{salt}{i}.png", "reference": f"{salt}{i}_ref.png",
                     "reference_mask": f"{salt}{i}_ref_mask.png", "caption": tw.caption_of(subject)})
    path = root / f"{salt}.jsonl"
    write_manifest(rows, str(path))
    return path


def make_model(seed=0):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import initialise_seeded, model_from_unet_config
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw

    return model_from_unet_config(tw.toy_unet_config(context_dim=TOY_CONTEXT), "eps", device="cpu",
                                  initialise=lambda unet: initialise_seeded(unet, seed))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import save_unet_weights
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw

    root = tmp_path_factory.mktemp("toy_observability")
    train = write_toy_manifest(root, "train", N_SAMPLES)
    held_out = write_toy_manifest(root, "heldout", 3)
    weights, config = root / "unet.safetensors", root / "unet.json"
    save_unet_weights(make_model(), str(weights))
    config.write_text(json.dumps({"unet_config": tw.toy_unet_config(context_dim=TOY_CONTEXT), "prediction": "eps"}))
    common = ["--unet-config", str(config), "--unet-weights", str(weights), "--cpu", "--toy-encoders",
              "--resolution", str(SIDE), "--no-progress", "--no-masks"]
    return {"root": root, "train": train, "held_out": held_out, "common": common}


def manifest_source(path):
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.training.training_manifest import read_manifest
    from comfyui_dreamcache.dreamcache_core.training.training_sources import ManifestSource

    return ManifestSource(read_manifest(str(path)), tw.ToyImageEncoder(), tw.ToyTextEncoder(TOY_CONTEXT), SIDE,
                          use_masks=False)


def make_trainer(model, source, output_dir, **overrides):
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature
    from comfyui_dreamcache.dreamcache_core.training.training_loop import AdapterTrainer, TrainConfig

    values = dict(output_dir=str(output_dir), steps=3, batch_size=2, lr=1e-3, save_every=0, progress=False, seed=3,
                  caption_dropout=0.0, reference_dropout=0.0, use_masks=False)
    values.update(overrides)
    unet = model.model.diffusion_model
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet), seed=0)
    return AdapterTrainer(model, adapter, source, TrainConfig(**values), log=lambda message: None)


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    images = {tag: accumulator.Images(tag) for tag in accumulator.Tags()["images"]}
    return scalars, images


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_png(path):
    from PIL import Image

    with Image.open(path) as handle:
        return torch.from_numpy(np.asarray(handle.convert("RGB")).copy()), dict(handle.text)


# --------------------------------------------------------------------------
# TensorBoard and the per-band losses
# --------------------------------------------------------------------------

def test_tensorboard_and_csv_hold_each_steps_loss_and_the_band_means(toy, tmp_path):
    """lr 0 keeps the adapter fixed, so every row's loss can be recomputed and the band means checked."""
    from comfyui_dreamcache.dreamcache_core.training.reference_gap import band_index
    from comfyui_dreamcache.dreamcache_core.training.training_loop import LOG_FIELDS

    model = make_model()
    trainer = make_trainer(model, manifest_source(toy["train"]), tmp_path, steps=4, lr=0.0, log_every=2,
                           timestep_range=(0, 999))
    trainer.train()
    expected = {}  # step -> [(band, loss)] of its rows
    with torch.no_grad():
        for step in range(4):
            draws = trainer.draws_for(step, 0)
            losses = trainer.draw_losses(draws).tolist()
            expected[step + 1] = [(band_index(d.timestep), loss) for d, loss in zip(draws, losses)]
    assert [loss for _, loss in trainer.history] == pytest.approx(
        [sum(v for _, v in expected[s]) / 2 for s in (1, 2, 3, 4)], rel=1e-5)

    rows = read_csv(tmp_path / "train_log.csv")
    assert list(rows[0].keys()) == LOG_FIELDS and [r["step"] for r in rows] == ["2", "4"]
    scalars, _ = read_events(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([loss for _, loss in trainer.history], rel=1e-6)
    assert [s for s, _ in scalars["train/grad_norm"]] == [1, 2, 3, 4]
    assert all(v > 0 for _, v in scalars["train/grad_norm"])
    assert float(rows[1]["grad_norm"]) == pytest.approx(scalars["train/grad_norm"][-1][1], rel=1e-3)
    assert [v for _, v in scalars["train/lr"]] == [0.0] * 4
    assert [s for s, _ in scalars["train/samples_per_s"]] == [2, 4]
    peak = scalars["train/peak_rss_gib"]  # on the CPU: the process's peak resident set size
    assert [s for s, _ in peak] == [2, 4] and all(0.05 < v < 64 for _, v in peak)
    assert float(rows[1]["peak_memory_mb"]) == pytest.approx(peak[1][1] * 1024, rel=1e-3)
    seen_bands = set()
    for row, steps in zip(rows, ((1, 2), (3, 4))):
        for band, name in enumerate(("low", "mid", "high")):
            values = [loss for s in steps for b, loss in expected[s] if b == band]
            tag = f"train/loss_t_{name}"
            if not values:
                assert row[f"loss_t_{name}"] == ""
                assert int(row["step"]) not in [s for s, _ in scalars.get(tag, [])]
                continue
            seen_bands.add(name)
            mean = sum(values) / len(values)
            assert float(row[f"loss_t_{name}"]) == pytest.approx(mean, rel=1e-5)
            assert dict(scalars[tag])[int(row["step"])] == pytest.approx(mean, rel=1e-5)
    assert len(seen_bands) >= 2  # 8 rows over three bands: the check above covers more than one


def test_training_without_tensorboard_says_so_once_and_still_trains(toy, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    messages = []
    trainer = make_trainer(make_model(), manifest_source(toy["train"]), tmp_path, steps=2)
    trainer.log = messages.append
    trainer.train()
    said = [m for m in messages if "TensorBoard" in m]
    assert len(said) == 1 and "pip install tensorboard" in said[0]
    assert not (tmp_path / "tensorboard").exists()
    assert len(read_csv(tmp_path / "train_log.csv")) == 2


# --------------------------------------------------------------------------
# Validation: the grid and the held-out reference gap
# --------------------------------------------------------------------------

def test_validation_writes_grid_and_gap_and_leaves_training_unchanged(toy, tmp_path, capsys):
    from comfyui_dreamcache.dreamcache_core.evaluation.generate import Sampler
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.training.reference_gap import GAP_FIELDS
    from comfyui_dreamcache.dreamcache_core.training.train import main
    from comfyui_dreamcache.dreamcache_core.training.validation import ValidationSettings, Validator, grid_size

    run = toy["common"] + ["--data", str(toy["train"]), "--steps", "4", "--batch-size", "2", "--lr", "3e-2",
                           "--save-every", "2", "--seed", "1"]
    validation = ["--validation-data", str(toy["held_out"]), "--validation-every", "2", "--validation-count", "3",
                  "--validation-steps", "3", "--validation-cfg", "4.0"]
    out, plain_out = tmp_path / "run", tmp_path / "without_validation"
    assert main(run + validation + ["--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert main(run + ["--output-dir", str(plain_out)]) == 0
    # validating (sampling, the gap's draws) does not change what training draws
    assert [r["loss"] for r in read_csv(out / "train_log.csv")] == [r["loss"] for r in read_csv(plain_out / "train_log.csv")]
    assert sorted(os.listdir(out / "validation")) == ["step-0000002.png", "step-0000004.png"]

    grid, text = read_png(out / "validation" / "step-0000004.png")
    assert tuple(grid.shape[:2]) == grid_size(3, 3, SIDE, SIDE)  # 3 held-out samples x (reference, with, without)
    info = json.loads(text["dreamcache_validation"])
    assert info["columns"] == ["reference", "personalised", "plain"] and info["seeds"] == [0, 1, 2]

    def tile(row, column):
        top, left = row * (SIDE + 2), column * (SIDE + 2)
        return grid[top:top + SIDE, left:left + SIDE].float()

    # the plain tile is the base's own sample at that row's seed, through generate's sampler
    model = make_model()
    held_out = manifest_source(toy["held_out"])
    settings = ValidationSettings(every=2, count=3, steps=3, cfg=4.0)
    checker = Validator(model, held_out, settings, tw.ToyImageEncoder().decode, use_masks=False)
    special = held_out.special()
    negative = [[special.empty_cond[None], {}]]
    for row in range(3):
        sample = held_out.prepared(row)
        assert info["prompts"][row] == sample.caption
        plain = Sampler(model, None, None, checker.sampler_settings("off"))
        with torch.inference_mode():
            latent = plain.sample([[sample.text_cond[None], {}]], negative, [row], tuple(sample.target_latent.shape))
        expected = (tw.ToyImageEncoder().decode(latent[0]).clamp(0, 1) * 255).round()
        assert torch.equal(tile(row, 2), expected), row
        assert (tile(row, 1) - tile(row, 2)).abs().max() > 2  # the adapter changes the image
        reference = (tw.ToyImageEncoder().decode(sample.reference_latent).clamp(0, 1) * 255).round()
        assert torch.equal(tile(row, 0), reference)

    # the gap: fixed draws, so recomputing it for the step-4 adapter gives the logged numbers
    gaps = read_csv(out / "reference_gap.csv")
    assert list(gaps[0].keys()) == GAP_FIELDS and [g["step"] for g in gaps] == ["2", "4"]
    adapter = load_adapter(str(out / "checkpoints" / "adapter-0000004.safetensors"))
    record = checker.gap(adapter, 4)
    for name in GAP_FIELDS[1:]:
        assert float(gaps[1][name]) == pytest.approx(record[name], rel=1e-4, abs=1e-7), name
    assert record["gap"] == pytest.approx(record["shuffled"] - record["matched"])
    assert record["gap"] == pytest.approx((record["gap_low"] + record["gap_mid"] + record["gap_high"]) / 3)
    assert gaps[0]["matched"] != gaps[1]["matched"]  # the adapter moved between the two validations
    for row in gaps:  # and each validation printed its gap
        assert (f"step {row['step']}: held-out reference gap {float(row['gap']):.5f} "
                f"(shuffled {float(row['shuffled']):.5f} - matched {float(row['matched']):.5f}") in printed
        assert f"step {row['step']}: validation grid {out / 'validation'}" in printed

    scalars, images = read_events(out / "tensorboard")
    assert [s for s, _ in scalars["reference_gap/gap"]] == [2, 4]
    assert scalars["reference_gap/gap"][1][1] == pytest.approx(record["gap"], rel=1e-4, abs=1e-7)
    assert [e.step for e in images["validation/grid"]] == [2, 4]
    assert (images["validation/grid"][1].width, images["validation/grid"][1].height) == (grid.shape[1], grid.shape[0])


def test_validation_prompts_give_a_row_per_sample_and_prompt(toy, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.train import main
    from comfyui_dreamcache.dreamcache_core.training.validation import grid_size

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# validation prompts\na ring\na star on a table\n")
    out = tmp_path / "run"
    assert main(toy["common"] + ["--data", str(toy["train"]), "--steps", "1", "--batch-size", "1",
                                 "--output-dir", str(out), "--validation-data", str(toy["held_out"]),
                                 "--validation-every", "1", "--validation-count", "2", "--validation-steps", "2",
                                 "--validation-prompts", str(prompts), "--no-tensorboard"]) == 0
    grid, text = read_png(out / "validation" / "step-0000001.png")
    assert tuple(grid.shape[:2]) == grid_size(4, 3, SIDE, SIDE)
    assert json.loads(text["dreamcache_validation"])["prompts"] == ["a ring", "a star on a table"] * 2
    assert not (out / "tensorboard").exists()


def test_validation_refuses_what_it_cannot_do(toy, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.train import main

    base = toy["common"] + ["--data", str(toy["train"]), "--steps", "1", "--output-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--validation-data"):
        main(base + ["--validation-every", "1"])
    with pytest.raises(ValueError, match="at least 2 held-out samples"):
        main(base + ["--validation-every", "1", "--validation-data", str(toy["held_out"]), "--validation-count", "1"])
    with pytest.raises(ValueError, match="between 1 and the number of validation samples"):
        main(base + ["--validation-every", "1", "--validation-data", str(toy["held_out"]), "--validation-count", "9"])
    no_decoder = [a for a in base if a != "--toy-encoders"]
    store = tmp_path / "store"
    assert main(toy["common"] + ["--data", str(toy["held_out"]), "--precompute", str(store), "--precompute-only"]) == 0
    with pytest.raises(ValueError, match="VAE"):
        main([a if a != str(toy["train"]) else str(store) for a in no_decoder]
             + ["--validation-every", "1", "--validation-data", str(store), "--validation-count", "2"])


# --------------------------------------------------------------------------
# The memory-lean optimizer
# --------------------------------------------------------------------------

def test_adafactor_trains_resumes_exactly_and_keeps_little_state(toy, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.sample_draws import SampleDraw
    from comfyui_dreamcache.dreamcache_core.training.training_loop import latest_checkpoint

    source = manifest_source(toy["train"])
    draws = [SampleDraw(i, i % N_SAMPLES, 600, False, False, 1000 + i) for i in range(N_SAMPLES)]
    overrides = dict(optimizer="adafactor", lr=3e-2, steps=6, batch_size=3, save_every=3)
    straight = make_trainer(make_model(), source, tmp_path / "a", **overrides)
    assert type(straight.optimizer).__name__ == "Adafactor"
    with torch.no_grad():
        start = float(straight.draw_losses(draws).mean())
    straight.train()
    with torch.no_grad():
        end = float(straight.draw_losses(draws).mean())
    assert end < 0.97 * start, (start, end)

    # optimizer state: Adafactor keeps a row and a column vector per matrix, AdamW two full moments
    parameters = sum(p.numel() for p in straight.adapter.parameters())
    state = sum(v.numel() for s in straight.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.ndim > 0)
    assert state < 0.1 * parameters

    interrupted = make_trainer(make_model(), source, tmp_path / "b", **overrides)
    interrupted.train(steps=3)
    checkpoint = latest_checkpoint(str(tmp_path / "b"))
    resumed = make_trainer(make_model(), source, tmp_path / "b", **overrides)
    resumed.resume(checkpoint)
    resumed.train()
    assert [loss for _, loss in resumed.history] == [loss for _, loss in straight.history[3:]]
    for (name, p), (_, q) in zip(straight.adapter.named_parameters(), resumed.adapter.named_parameters()):
        assert torch.equal(p, q), name

    other = make_trainer(make_model(), source, tmp_path / "b", **dict(overrides, optimizer="adamw"))
    with pytest.raises(ValueError, match="--optimizer adafactor"):
        other.resume(checkpoint)
