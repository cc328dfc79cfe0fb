"""Training from public-data layouts through ComfyUI's real code: the authors' layout and prepared Subjects200K,
auto-detected by ``train --data``, online augmentation (and its exact resume), precomputed K variants.

A tiny SD-shaped U-Net with seeded weights and the toy world's encoders; skipped when COMFYUI_PATH is unset.
"""
import csv
import json
import math

import pytest
import torch

from data_source_fixtures import colour_segmenter, subjects200k_record, write_authors_layout, write_subjects200k

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

TOY_CONTEXT = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import (initialise_seeded, model_from_unet_config,
                                                                       save_unet_weights)

    root = tmp_path_factory.mktemp("public_data")
    model = model_from_unet_config(tw.toy_unet_config(context_dim=TOY_CONTEXT), "eps", device="cpu",
                                   initialise=lambda unet: initialise_seeded(unet, 0))
    save_unet_weights(model, str(root / "unet.safetensors"))
    (root / "unet.json").write_text(json.dumps({"unet_config": tw.toy_unet_config(context_dim=TOY_CONTEXT),
                                                "prediction": "eps"}))
    authors = root / "authors"
    write_authors_layout(str(authors), objects=2, stems=2)
    (authors / "object_009").mkdir()
    (authors / "object_009" / "x_generation.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (authors / "object_009" / "x_caption.txt").write_text("a broken toy")
    (authors / "object_009" / "x_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (authors / "object_009" / "y_generation.png").write_bytes(b"no mask beside me")
    return {"root": root, "model": model, "authors": authors,
            "common": ["--unet-config", str(root / "unet.json"), "--unet-weights", str(root / "unet.safetensors"),
                       "--cpu", "--toy-encoders", "--resolution", "32", "--batch-size", "2", "--lr", "1e-3",
                       "--no-progress"]}


def losses_of(run):
    with open(run / "train_log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_train_reads_the_authors_layout_augments_online_skips_bad_rows_and_resumes_bit_for_bit(base, tmp_path, capsys):
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.training.train import main as train

    args = base["common"] + ["--data", str(base["authors"])]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    # 5 rows: the 6 samples of 3 steps x 2 meet the corrupt one in the first epoch
    assert train(args + ["--steps", "3", "--save-every", "2", "--output-dir", str(straight)]) == 0
    out = capsys.readouterr().out
    assert "5 triplets in 3 object folders, 1 skipped" in out and "no mask and caption" in out
    assert "1 row(s) skipped when read" in out and "object_009/x" in out
    losses = losses_of(straight)
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    state = torch.load(str(straight / "checkpoints" / "adapter-0000003.state.pt"), weights_only=True)
    assert json.loads(state["config"])["caption_dropout"] == 0.07  # the authors' empty-caption rate

    assert train(args + ["--steps", "2", "--save-every", "2", "--output-dir", str(interrupted)]) == 0
    assert train(args + ["--steps", "3", "--save-every", "2", "--output-dir", str(interrupted),
                         "--resume", "auto"]) == 0
    assert losses_of(interrupted) == losses
    a = load_adapter(str(straight / "dreamcache_adapter.safetensors"))
    b = load_adapter(str(interrupted / "dreamcache_adapter.safetensors"))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    # the augmentation is drawn per step: without it the run differs once the adapter is no longer the identity
    plain = tmp_path / "plain"
    assert train(args + ["--steps", "3", "--save-every", "0", "--augment", "none", "--caption-dropout", "0.07",
                         "--output-dir", str(plain)]) == 0
    plain_losses = losses_of(plain)
    assert plain_losses[0] == losses[0]  # a fresh adapter is the identity: the reference does not matter yet
    assert plain_losses[2] != losses[2]


def test_prepared_subjects200k_trains_and_precomputes_k_variants(base, tmp_path):
    from comfyui_dreamcache.dreamcache_core.training import prepare_subjects200k as prep
    from comfyui_dreamcache.dreamcache_core.training.train import main as train
    from comfyui_dreamcache.dreamcache_core.training.precomputed_store import PrecomputedStore

    parquet = tmp_path / "s200k" / "data"
    write_subjects200k(parquet / "train-00000-of-00001.parquet",
                       [subjects200k_record(n) for n in range(2)] + [subjects200k_record(2, quality=(5, 5, 3))])
    prepared = tmp_path / "prepared"
    summary = prep.run_preparation(["--parquet", str(parquet), "--out", str(prepared), "--shard-size", "2",
                                    "--reference-size", "32", "--quiet"], segmenter=colour_segmenter(),
                                   log=lambda m: None)
    assert summary.rows == 4 and dict(summary.skipped) == {"low quality": 1}
    with pytest.raises(ValueError, match="prepare_subjects200k --parquet"):
        train(base["common"] + ["--data", str(tmp_path / "s200k"), "--steps", "1"])

    run = tmp_path / "run"
    assert train(base["common"] + ["--data", str(prepared), "--steps", "2", "--save-every", "0",
                                   "--output-dir", str(run)]) == 0
    assert len(losses_of(run)) == 2

    store = tmp_path / "store"
    assert train(base["common"] + ["--data", str(prepared), "--precompute", str(store), "--precompute-caches",
                                   "--augment-variants", "2", "--precompute-only"]) == 0
    info = PrecomputedStore(str(store))
    assert info.reference_variants == 2 and len(info) == 4 and info.has_caches
    assert info.info["source"]["augment"] == "authors"
    caches = [info.read_sample(0, v).cache for v in range(2)]
    assert all(c is not None for c in caches)
    layer = next(iter(caches[0].features))
    assert not torch.equal(caches[0].features[layer], caches[1].features[layer])  # each variant has its own cache
    from_store = tmp_path / "from_store"
    assert train(base["common"] + ["--data", str(store), "--steps", "2", "--save-every", "0",
                                   "--output-dir", str(from_store)]) == 0
    losses = losses_of(from_store)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    state = torch.load(str(from_store / "checkpoints" / "adapter-0000002.state.pt"), weights_only=True)
    assert json.loads(state["config"])["caption_dropout"] == 0.07  # the store remembers it was augmented
