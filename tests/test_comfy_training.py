"""Adapter training through ComfyUI's real code, on a tiny SD-shaped U-Net and toy data.

Skipped (with the reason) when COMFYUI_PATH is unset.
"""
import math
import os

import pytest
import torch

from tiny_models import ksample
from run_as_comfyui import run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

N_SAMPLES = 6
TOY_CONTEXT = 32


def _config(tmp, **overrides):
    from comfyui_dreamcache.dreamcache_core.training.training_loop import TrainConfig

    values = dict(output_dir=str(tmp), steps=4, batch_size=2, lr=1e-3, save_every=2, progress=False, seed=3,
                  caption_dropout=0.0, reference_dropout=0.0, use_masks=False)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.io.image_files import save_png
    from comfyui_dreamcache.dreamcache_core.training.sample_draws import generator_for
    from comfyui_dreamcache.dreamcache_core.training.training_manifest import read_manifest, write_manifest

    root = tmp_path_factory.mktemp("toy_manifest")
    train, _ = tw.split_subjects()
    rows = []
    for i in range(N_SAMPLES):
        subject = train[i * 7]
        generator = generator_for("test-toy", i)
        image, mask = tw.render(subject, generator)
        reference, reference_mask = tw.make_reference(image, mask, generator)
        save_png(image, str(root / f"t{i}.png"), quantize="round")
        save_png(reference, str(root / f"r{i}.png"), quantize="round")
        save_png(reference_mask, str(root / f"r{i}_mask.png"), quantize="round")
        rows.append({"target": f"t{i}.png", "reference": f"r{i}.png", "reference_mask": f"r{i}_mask.png",
                     "caption": tw.caption_of(subject), "id": str(i)})
    write_manifest(rows, str(root / "manifest.jsonl"))
    manifest = read_manifest(str(root / "manifest.jsonl"))
    assert len(manifest.rows) == N_SAMPLES and not manifest.skipped
    return {"root": root, "manifest": manifest}


def make_model(prediction="eps", seed=0):
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import initialise_seeded, model_from_unet_config

    return model_from_unet_config(tw.toy_unet_config(context_dim=TOY_CONTEXT), prediction, device="cpu",
                                  initialise=lambda unet: initialise_seeded(unet, seed))


def make_source(world, use_masks=False):
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.training.training_sources import ManifestSource

    return ManifestSource(world["manifest"], tw.ToyImageEncoder(), tw.ToyTextEncoder(TOY_CONTEXT), 32,
                          use_masks=use_masks)


def make_trainer(model, source, config, adapter_seed=0):
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature
    from comfyui_dreamcache.dreamcache_core.training.training_loop import AdapterTrainer

    unet = model.model.diffusion_model
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet), seed=adapter_seed)
    return AdapterTrainer(model, adapter, source, config, log=lambda message: None)


def fixed_draws(count=N_SAMPLES, timestep=600):
    from comfyui_dreamcache.dreamcache_core.training.sample_draws import SampleDraw

    return [SampleDraw(i, i % N_SAMPLES, timestep, False, False, 1000 + i) for i in range(count)]


# --------------------------------------------------------------------------
# The loss target is the model's own
# --------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_target_and_residual_are_in_the_models_output_space(comfy, prediction):
    from comfyui_dreamcache.dreamcache_core.training.training_loss import (conditioning_of, model_output_target,
                                                                   predict_residual)

    model = make_model(prediction)
    model_sampling = model.get_model_object("model_sampling")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    sigmas = model_sampling.sigma(torch.tensor([100.0, 800.0]))
    scale = 0.18215  # SD1.5 latent format: what process_latent_in applies
    x0_in = x0 * scale
    x_t = x0_in + sigmas.view(-1, 1, 1, 1) * noise
    target = model_output_target(model_sampling, sigmas, x_t, x0_in)
    if prediction == "eps":
        assert torch.allclose(target, noise, atol=1e-4)
    else:
        s = sigmas.view(-1, 1, 1, 1)
        assert torch.allclose(target, (noise - s * x0_in) / torch.sqrt(1 + s ** 2), atol=1e-4)

    outputs = []
    handle = model.model.diffusion_model.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    try:
        cond = torch.randn(2, 4, TOY_CONTEXT, generator=generator)
        residual = predict_residual(model, x0, noise, sigmas, conditioning_of(cond, None))
    finally:
        handle.remove()
    assert len(outputs) == 1
    assert torch.allclose(residual, outputs[0].float() - target, atol=2e-4)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

def test_only_adapter_parameters_get_gradients(world, tmp_path):
    model = make_model()
    trainer = make_trainer(model, make_source(world), _config(tmp_path))
    loss = trainer.draw_losses(fixed_draws(2)).mean()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.model.parameters())
    grads = {name: p.grad for name, p in trainer.adapter.named_parameters()}
    assert all(g is not None for g in grads.values())
    # W_cat = [I | 0] at the start: only the memory half of W_cat (and b_cat) can move on the first step
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "linear_cat" in name)


def test_loss_goes_down_and_base_model_is_bit_identical(world, tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer = make_trainer(model, make_source(world), _config(tmp_path, steps=20, batch_size=3, lr=3e-3,
                                                               save_every=0))
    draws = fixed_draws()
    with torch.no_grad():
        start = float(trainer.draw_losses(draws).mean())
    trainer.train()
    with torch.no_grad():
        end = float(trainer.draw_losses(draws).mean())
    assert end < 0.97 * start, (start, end)
    after = model.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert os.path.isfile(tmp_path / "dreamcache_adapter.safetensors")
    with open(tmp_path / "train_log.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 21


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.training_loop import latest_checkpoint

    source = make_source(world)
    overrides = dict(steps=4, save_every=2, caption_dropout=0.3, reference_dropout=0.3)
    straight = make_trainer(make_model(), source, _config(tmp_path / "a", **overrides))
    straight.train()

    interrupted = make_trainer(make_model(), source, _config(tmp_path / "b", **overrides))
    interrupted.train(steps=2)
    checkpoint = latest_checkpoint(str(tmp_path / "b"))
    assert checkpoint.endswith("adapter-0000002.safetensors")
    resumed = make_trainer(make_model(), source, _config(tmp_path / "b", **overrides), adapter_seed=99)
    resumed.resume(checkpoint)
    resumed.train()
    assert [loss for _, loss in resumed.history] == [loss for _, loss in straight.history[2:]]
    for (name, p), (_, q) in zip(straight.adapter.named_parameters(), resumed.adapter.named_parameters()):
        assert torch.equal(p, q), name


def test_precomputed_and_on_the_fly_data_give_the_same_loss(world, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.precomputed_store import PrecomputedStore
    from comfyui_dreamcache.dreamcache_core.training.training_sources import StoreSource, precompute

    model = make_model()
    on_the_fly = make_source(world, use_masks=True)
    precompute(on_the_fly, str(tmp_path / "store"), model, caches=True, progress=False, log=lambda m: None)
    stored = StoreSource(PrecomputedStore(str(tmp_path / "store")), use_masks=True)
    assert stored.has_caches and len(stored) == N_SAMPLES
    latents_only = tmp_path / "store_latents"
    precompute(on_the_fly, str(latents_only), model, caches=False, progress=False, log=lambda m: None)
    stored_latents = StoreSource(PrecomputedStore(str(latents_only)), use_masks=True)

    config = _config(tmp_path / "run", use_masks=True, caption_dropout=0.5, reference_dropout=0.5)
    draws = fixed_draws() + [d for d in make_trainer(model, on_the_fly, config).draws_for(0, 0)]
    losses = []
    for source in (on_the_fly, stored, stored_latents):
        trainer = make_trainer(model, source, config)
        trainer.adapter.randomize_(seed=5, scale=0.3)
        with torch.no_grad():
            losses.append(trainer.draw_losses(draws))
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(losses[0], losses[2])


def test_batched_rows_match_rows_one_by_one(world, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.training_loss import denoising_losses

    model = make_model()
    trainer = make_trainer(model, make_source(world), _config(tmp_path))
    trainer.adapter.randomize_(seed=2, scale=0.3)
    rows = [trainer.loss_row(d) for d in fixed_draws()]
    with torch.no_grad():
        together = denoising_losses(model, trainer.adapter, rows)
        alone = torch.stack([denoising_losses(model, trainer.adapter, [row])[0] for row in rows])
        # each row sees its own reference: shuffling the references changes the losses
        shuffled = [type(r)(r.latent, r.noise, r.sigma, r.cond, r.pooled, rows[(i + 1) % len(rows)].cache)
                    for i, r in enumerate(rows)]
        other = denoising_losses(model, trainer.adapter, shuffled)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(together, other, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(world, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.training_loss import gradient_checkpointing

    model = make_model()
    trainer = make_trainer(model, make_source(world), _config(tmp_path))
    trainer.adapter.randomize_(seed=4, scale=0.3)
    results = []
    for enabled in (False, True):
        trainer.adapter.zero_grad(set_to_none=True)
        with gradient_checkpointing(trainer.unet, enabled):
            loss = trainer.draw_losses(fixed_draws(3)).mean()
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.adapter.parameters()]))
    assert not any("forward" in m.__dict__ for m in trainer.unet.modules())
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)


def test_dropout_uses_the_empty_caption_and_the_null_reference(world, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.sample_draws import SampleDraw

    model = make_model()
    source = make_source(world)
    trainer = make_trainer(model, source, _config(tmp_path))
    row = trainer.loss_row(SampleDraw(0, 1, 500, True, True, 7))
    special = source.special()
    assert torch.equal(row.cond, special.empty_cond)
    assert row.cache is trainer.null_cache()
    white_latent = special.null_reference_latent
    assert torch.equal(white_latent, source.image_encoder(torch.ones(32, 32, 3)))
    kept = trainer.loss_row(SampleDraw(0, 1, 500, False, False, 7))
    assert torch.equal(kept.cond, source.prepared(1).text_cond)
    assert kept.cache is not trainer.null_cache()


def test_saved_adapter_loads_in_apply_and_changes_the_output(world, tmp_path):
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.training.training_sources import reference_cache
    from comfyui_dreamcache.nodes.apply import DreamCacheApply

    model = make_model()
    source = make_source(world)
    trainer = make_trainer(model, source, _config(tmp_path, steps=3, lr=1e-2, save_every=0))
    path = trainer.train()
    adapter = load_adapter(path)
    assert adapter.keys() == trainer.adapter.keys()
    cache = reference_cache(model, source.prepared(0), 0, source.special())
    (patched,) = run_node(DreamCacheApply, model, adapter, cache, 1.0, 0.0, 1.0, "positive only")
    cond, _ = source.text_encoder("a ring")
    empty, _ = source.text_encoder("")
    positive, negative = [[cond[None], {}]], [[empty[None], {}]]
    latent = torch.zeros(1, 4, 8, 8)
    plain = ksample(model, positive, negative, latent, seed=1, steps=3)
    personalised = ksample(patched, positive, negative, latent, seed=1, steps=3)
    assert not torch.allclose(plain, personalised)
    (same,) = run_node(DreamCacheApply, model, adapter, cache, 0.0, 0.0, 1.0, "positive only")
    assert torch.equal(ksample(same, positive, negative, latent, seed=1, steps=3), plain)


def test_command_line_trains_resumes_and_precomputes(world, tmp_path):
    import json

    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.training.train import main
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import save_unet_weights

    model = make_model()
    weights = tmp_path / "unet.safetensors"
    save_unet_weights(model, str(weights))
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"unet_config": tw.toy_unet_config(context_dim=TOY_CONTEXT), "prediction": "eps"}))
    common = ["--unet-config", str(config), "--unet-weights", str(weights), "--cpu", "--toy-encoders",
              "--resolution", "32", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--no-masks"]
    out = tmp_path / "run"
    assert main(common + ["--data", str(world["manifest"].path), "--precompute", str(tmp_path / "pre"),
                          "--precompute-caches", "--precompute-only"]) == 0
    assert (tmp_path / "pre" / "store.json").is_file()
    assert main(common + ["--data", str(tmp_path / "pre"), "--output-dir", str(out), "--steps", "2",
                          "--save-every", "1"]) == 0
    assert main(common + ["--data", str(tmp_path / "pre"), "--output-dir", str(out), "--steps", "3",
                          "--resume", "auto"]) == 0
    adapter = load_adapter(str(out / "dreamcache_adapter.safetensors"))
    assert adapter.keys() == [s for s in adapter.specs]
    lines = (out / "train_log.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2", "3"]
    assert sorted(os.listdir(out / "checkpoints")) == [
        "adapter-0000001.safetensors", "adapter-0000001.state.pt", "adapter-0000002.safetensors",
        "adapter-0000002.state.pt", "adapter-0000003.safetensors", "adapter-0000003.state.pt"]
    assert not math.isnan(float(lines[-1].split(",")[2]))


def test_toy_benchmark_runs_end_to_end_and_reuses_its_base(tmp_path, comfy):
    """The acceptance benchmark, shrunk: data, base pretraining, the real train CLI per seed, the table."""
    from comfyui_dreamcache.dreamcache_core.toy import toy_benchmark

    out = tmp_path / "toy"
    argv = ["--out", str(out), "--seeds", "0", "1", "--train-samples", "48", "--eval-samples", "12",
            "--base-steps", "3", "--adapter-steps", "2", "--batch-size", "4", "--classifier-steps", "5"]
    status = toy_benchmark.main(argv)
    report = (out / "report.md").read_text()
    assert status in (0, 1) and ("yes;" in report) == (status == 0)
    rows = [line for line in report.splitlines() if line.startswith(("| low t", "| mid t", "| high t", "| overall"))]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        matched, shuffled, none = (float(cells[i].split(" ")[0]) for i in (1, 2, 3))
        assert all(math.isfinite(x) and x > 0 for x in (matched, shuffled, none))
        assert float(cells[4].split(" ")[0]) == pytest.approx(shuffled - matched, abs=2e-4)
    for seed in (0, 1):
        assert (out / f"adapter_seed{seed}" / "dreamcache_adapter.safetensors").is_file()
    assert (out / "base_samples.png").is_file() and (out / "heldout_samples.png").is_file()

    # a second run with the same recipe reuses the pretrained base bit for bit
    weights = (out / "toy_base_unet.safetensors").read_bytes()
    toy_benchmark.main(argv[:4] + argv[5:])  # one seed this time
    assert (out / "toy_base_unet.safetensors").read_bytes() == weights
    assert "reused from an earlier run" in (out / "report.md").read_text()


def test_torchrun_two_processes_train_exactly_like_one_with_the_whole_batch(world, tmp_path):
    """Same script under torchrun (gloo, CPU): 2 processes x batch 1 = 1 process x batch 2, step for step."""
    import csv
    import json
    import subprocess
    import sys

    from conftest import PACK_ROOT
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.training.train import main
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import save_unet_weights

    weights, config = tmp_path / "unet.safetensors", tmp_path / "unet.json"
    save_unet_weights(make_model(), str(weights))
    config.write_text(json.dumps({"unet_config": tw.toy_unet_config(context_dim=TOY_CONTEXT), "prediction": "eps"}))
    common = ["--unet-config", str(config), "--unet-weights", str(weights), "--cpu", "--toy-encoders",
              "--resolution", "32", "--lr", "1e-3", "--no-progress", "--no-masks", "--seed", "5"]
    store = tmp_path / "pre"
    assert main(common + ["--data", str(world["manifest"].path), "--precompute", str(store),
                          "--precompute-caches", "--precompute-only"]) == 0
    run = common + ["--data", str(store), "--steps", "3", "--save-every", "0"]

    assert main(run + ["--output-dir", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "dreamcache_core.training.train", *run, "--output-dir", str(tmp_path / "two"), "--batch-size", "1"],
        cwd=str(PACK_ROOT), capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "2 process(es)" in launched.stdout

    def losses(folder):
        with open(folder / "train_log.csv") as handle:
            return [(row["step"], row["samples"], float(row["loss"])) for row in csv.DictReader(handle)]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[:2] for r in one] == [r[:2] for r in two] == [("1", "2"), ("2", "4"), ("3", "6")]
    assert [r[2] for r in two] == pytest.approx([r[2] for r in one], rel=1e-5)
    a = load_adapter(str(tmp_path / "one" / "dreamcache_adapter.safetensors")).state_dict()
    b = load_adapter(str(tmp_path / "two" / "dreamcache_adapter.safetensors")).state_dict()
    assert a.keys() == b.keys()
    # The all-reduced gradient differs from the one-process gradient by float summation order only; AdamW
    # divides by sqrt(v), which turns such noise on near-zero gradients into steps of up to lr. So: every
    # weight within lr (1e-3), and all but a few in a thousand within 1e-6.
    far = total = 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-3, rtol=0), name
        far += int(((a[name] - b[name]).abs() > 1e-6).sum())
        total += a[name].numel()
    assert far / total < 0.005, f"{far} of {total} adapter weights differ by more than 1e-6"
