"""Training data, dataset builder, augmentation and the sample stream (pure torch, no ComfyUI)."""
import json
import os

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
from comfyui_dreamcache.dreamcache_core.training.dataset import AugmentSettings, augment_reference, build_dataset, main
from comfyui_dreamcache.dreamcache_core.io.image_files import load_image, load_mask, save_png
from comfyui_dreamcache.dreamcache_core.training.precomputed_store import (PrecomputedStore, PreparedSample, SpecialInputs)
from comfyui_dreamcache.dreamcache_core.training.sample_draws import draw_sample, generator_for, sample_index
from comfyui_dreamcache.dreamcache_core.training.training_manifest import read_manifest, write_manifest


def _subject_image(seed=0, size=32):
    subject = tw.all_subjects()[seed * 5]
    return tw.render(subject, generator_for("core-test", seed), size=size)


@pytest.fixture
def files(tmp_path):
    image, mask = _subject_image()
    save_png(image, str(tmp_path / "good.png"), quantize="round")
    save_png(image, str(tmp_path / "ref.png"), quantize="round")
    save_png(mask, str(tmp_path / "ref_mask.png"), quantize="round")
    save_png(torch.zeros(32, 32), str(tmp_path / "empty_mask.png"), quantize="round")
    save_png(torch.ones(16, 32), str(tmp_path / "wide_mask.png"), quantize="round")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def test_manifest_keeps_good_rows_and_says_why_it_skips_bad_ones(files):
    good = {"target": "good.png", "reference": "ref.png", "reference_mask": "ref_mask.png", "caption": "a thing"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"target": "good.png", "caption": "x"}),
        json.dumps(dict(good, target="missing.png")),
        json.dumps(dict(good, reference="broken.png")),
        json.dumps(dict(good, reference_mask="empty_mask.png")),
        json.dumps(dict(good, reference_mask="wide_mask.png")),
        json.dumps(dict(good, caption=3)),
        json.dumps(dict(good, colour="red")),
        "# a comment",
        "",
        json.dumps({"target": "good.png", "reference": "ref.png", "caption": "", "id": "no-mask"}),
    ]
    (files / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    manifest = read_manifest(str(files / "manifest.jsonl"))
    assert [r.line for r in manifest.rows] == [1, 12]
    assert [r.index for r in manifest.rows] == [0, 1]
    assert manifest.rows[0].target == str(files / "good.png") and manifest.rows[0].reference_mask.endswith("ref_mask.png")
    assert manifest.rows[1].reference_mask is None and manifest.rows[1].id == "no-mask"
    reasons = {s.line: s.reason for s in manifest.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in reasons[2]
    assert "missing field(s) reference" in reasons[3]
    assert "target file not found" in reasons[4]
    assert "reference image cannot be read" in reasons[5]
    assert "reference_mask is empty" in reasons[6]
    assert "aspect ratio" in reasons[7]
    assert "caption must be a string" in reasons[8]
    assert "unknown field(s) colour" in reasons[9]
    assert "8 skipped" in manifest.report()


def test_manifest_round_trip_uses_relative_paths(files):
    rows = read_manifest_rows(files)
    write_manifest(rows, str(files / "sub" / "copy.jsonl"))
    text = (files / "sub" / "copy.jsonl").read_text()
    assert '"../good.png"' in text
    again = read_manifest(str(files / "sub" / "copy.jsonl"))
    assert [r.target for r in again.rows] == [r.target for r in rows]


def read_manifest_rows(files):
    (files / "m.jsonl").write_text(json.dumps({"target": "good.png", "reference": "ref.png", "caption": "c"}) + "\n")
    return read_manifest(str(files / "m.jsonl")).rows


def test_missing_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="dreamcache_core.training.dataset"):
        read_manifest(str(tmp_path / "nope.jsonl"))


def test_augmentation_is_deterministic_white_filled_and_keeps_the_subject():
    from comfyui_dreamcache.dreamcache_core.masking.reference_mask import cut_subject_on_white

    image, mask = _subject_image(3, size=48)
    cut, cut_mask = cut_subject_on_white(image, mask, 48)
    first = augment_reference(cut, cut_mask, generator_for("aug", 1))
    again = augment_reference(cut, cut_mask, generator_for("aug", 1))
    other = augment_reference(cut, cut_mask, generator_for("aug", 2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    out_image, out_mask = first
    assert out_image.shape == (48, 48, 3) and out_mask.shape == (48, 48)
    assert bool((out_mask >= 0.5).any())
    background = out_mask == 0
    assert torch.allclose(out_image[background], torch.ones_like(out_image[background]), atol=1e-5)
    identity = AugmentSettings(flip_probability=0.0, scale_range=(1.0, 1.0), shift_fraction=0.0, max_rotation_degrees=0.0)
    same_image, same_mask = augment_reference(cut, cut_mask, generator_for("aug", 1), identity)
    assert torch.allclose(same_image, cut, atol=1e-5) and torch.allclose(same_mask, cut_mask, atol=1e-5)
    flipped = AugmentSettings(flip_probability=1.0, scale_range=(1.0, 1.0), shift_fraction=0.0, max_rotation_degrees=0.0)
    flip_image, _ = augment_reference(cut, cut_mask, generator_for("aug", 1), flipped)
    assert torch.allclose(flip_image, cut.flip(1), atol=1e-5)


def test_dataset_builder_writes_a_valid_manifest_and_reports_skips(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(3):
        image, mask = _subject_image(i)
        save_png(image, str(images / f"p{i}.png"), quantize="round")
        save_png(mask, str(images / f"p{i}_mask.png"), quantize="round")
    (images / "p0.txt").write_text("a thing on a table\n")
    (images / "captions.csv").write_text("file,caption\np1.png,a thing outdoors\np2.png,a thing indoors\n"
                                         "p3.png,no mask\np4.png,empty mask\np5.png,broken\n")
    save_png(_subject_image(4)[0], str(images / "p3.png"), quantize="round")                       # no mask, no SAM
    save_png(_subject_image(5)[0], str(images / "p4.png"), quantize="round")
    save_png(torch.zeros(32, 32), str(images / "p4_mask.png"), quantize="round")                    # empty mask
    (images / "p5.png").write_bytes(b"garbage")                                     # unreadable
    save_png(_subject_image(6)[0], str(images / "p6.png"), quantize="round")                        # no caption
    out = tmp_path / "data"
    report = build_dataset(str(images), str(out), str(images / "captions.csv"), reference_size=40,
                           references_per_image=2, log=lambda m: None)
    assert len(report.rows) == 6
    skipped = dict(report.skipped)
    assert set(skipped) == {"p3.png", "p4.png", "p5.png", "p6.png"}
    assert "no mask" in skipped["p3.png"] and "no SAM" in skipped["p3.png"]
    assert "mask is empty" in skipped["p4.png"]
    assert "cannot be read" in skipped["p5.png"]
    assert "no caption" in skipped["p6.png"]
    assert (out / "skipped.txt").read_text().count("\n") == 4
    manifest = read_manifest(str(out / "manifest.jsonl"))
    assert len(manifest.rows) == 6 and not manifest.skipped
    assert [r.caption for r in manifest.rows[:3]] == ["a thing on a table", "a thing on a table", "a thing outdoors"]
    reference = load_image(manifest.rows[0].reference, transparency="white")
    reference_mask = load_mask(manifest.rows[0].reference_mask)
    assert reference.shape == (40, 40, 3)
    assert bool((reference_mask >= 0.5).any())
    assert float(reference[reference_mask == 0].min()) > 0.99  # white outside the subject
    # the same seed rebuilds the same references
    again = build_dataset(str(images), str(tmp_path / "again"), str(images / "captions.csv"), reference_size=40,
                          references_per_image=2, log=lambda m: None)
    assert torch.equal(load_image(again.rows[1].reference, transparency="white"),
                       load_image(report.rows[1].reference, transparency="white"))


def test_dataset_builder_uses_the_segmenter_when_no_mask_is_given(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    image, mask = _subject_image(2)
    save_png(image, str(images / "a.png"), quantize="round")
    (images / "a.txt").write_text("a thing")
    calls = []

    def segmenter(picture):
        calls.append(tuple(picture.shape))
        return mask

    report = build_dataset(str(images), str(tmp_path / "out"), segmenter=segmenter, reference_size=32, log=lambda m: None)
    assert calls == [(32, 32, 3)] and len(report.rows) == 1
    report = build_dataset(str(images), str(tmp_path / "out2"), segmenter=lambda p: torch.zeros(32, 32),
                           reference_size=32, log=lambda m: None)
    assert report.rows == [] and "SAM found nothing" in report.skipped[0][1]


def test_dataset_validate_command(files, capsys):
    (files / "m.jsonl").write_text(json.dumps({"target": "good.png", "reference": "missing.png", "caption": "c"}) + "\n")
    assert main(["--validate", str(files / "m.jsonl")]) == 1
    assert "reference file not found" in capsys.readouterr().out


def test_sample_stream_is_an_epoch_permutation_and_draws_are_reproducible():
    count = 7
    first_epoch = sorted(sample_index(3, d, count) for d in range(count))
    assert first_epoch == list(range(count))
    second = [sample_index(3, d, count) for d in range(count, 2 * count)]
    assert sorted(second) == list(range(count)) and second != [sample_index(3, d, count) for d in range(count)]
    a = draw_sample(3, 11, count, 0.5, 0.5)
    b = draw_sample(3, 11, count, 0.5, 0.5)
    assert a == b and torch.equal(a.noise((4, 2, 2)), b.noise((4, 2, 2)))
    assert draw_sample(4, 11, count, 0.5, 0.5) != a
    draws = [draw_sample(0, d, count, 0.1, 0.2) for d in range(2000)]
    assert 0.06 < sum(d.drop_caption for d in draws) / 2000 < 0.14
    assert 0.16 < sum(d.drop_reference for d in draws) / 2000 < 0.24
    assert min(d.timestep for d in draws) >= 0 and max(d.timestep for d in draws) <= 999
    never = [draw_sample(0, d, count, 0.0, 0.0) for d in range(200)]
    assert not any(d.drop_caption or d.drop_reference for d in never)


def test_store_round_trip(tmp_path):
    from comfyui_dreamcache.dreamcache_core.method.cache import DreamCache

    cache = DreamCache({"middle_block.1": torch.randn(1, 8, 2, 2)}, {"middle_block.1": torch.tensor([[1, 0, 1, 1]]).bool()},
                       {"seed": 3})
    sample = PreparedSample(torch.randn(4, 8, 8), torch.randn(4, 8, 8), torch.randn(4, 32), torch.randn(16),
                            torch.rand(32, 32), cache, "a ring")
    store = PrecomputedStore(str(tmp_path))
    store.write_sample(0, sample)
    store.write_special(SpecialInputs(torch.randn(4, 32), None, torch.randn(4, 8, 8)))
    store.write_info(1, True, {"note": "x"})
    again = PrecomputedStore(str(tmp_path))
    assert len(again) == 1 and again.has_caches and PrecomputedStore.is_store(str(tmp_path))
    read = again.read_sample(0)
    for name in ("target_latent", "reference_latent", "text_cond", "text_pooled", "reference_mask"):
        assert torch.equal(getattr(read, name), getattr(sample, name)), name
    assert read.caption == "a ring"
    assert torch.equal(read.cache.features["middle_block.1"], cache.features["middle_block.1"])
    assert torch.equal(read.cache.token_masks["middle_block.1"], cache.token_masks["middle_block.1"])
    assert read.cache.metadata == {"seed": 3}
    special = again.read_special()
    assert special.empty_pooled is None and special.null_cache is None
    with pytest.raises(ValueError, match="missing"):
        again.read_sample(5)


def test_store_keeps_a_thousand_samples_per_folder_and_reads_flat_older_stores(tmp_path):
    import shutil

    sample = PreparedSample(torch.randn(4, 8, 8), torch.randn(4, 8, 8), torch.randn(4, 32), caption="a cup")
    store = PrecomputedStore(str(tmp_path))
    for index in (0, 999, 1000, 123456):
        store.write_sample(index, sample)
    assert sorted(os.listdir(tmp_path / "samples")) == ["00000", "00001", "00123"]
    assert sorted(os.listdir(tmp_path / "samples" / "00000")) == ["00000000.safetensors", "00000999.safetensors"]
    assert (tmp_path / "samples" / "00123" / "00123456.safetensors").is_file()
    # a store of the earlier, flat layout still reads
    shutil.move(str(tmp_path / "samples" / "00001" / "00001000.safetensors"), str(tmp_path / "samples"))
    assert store.sample_path(1000) == str(tmp_path / "samples" / "00001000.safetensors")
    assert store.read_sample(1000).caption == "a cup"


def test_toy_world_is_deterministic_and_captions_leave_out_colour_and_texture():
    train, held = tw.split_subjects()
    assert len(train) + len(held) == 192 and not set(train) & set(held)
    subject = held[0]
    image_a, mask_a = tw.render(subject, generator_for("x", 1))
    image_b, mask_b = tw.render(subject, generator_for("x", 1))
    assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    caption = tw.caption_of(subject)
    assert subject.shape in caption and subject.colour not in caption and subject.texture not in caption
    encoder = tw.ToyImageEncoder()
    latent = encoder(image_a)
    assert latent.shape == (4, 8, 8)
    assert torch.allclose(encoder.decode(encoder(torch.full((8, 8, 3), 0.3)))[0, 0], torch.full((3,), 0.3), atol=1e-5)
    text = tw.ToyTextEncoder(32)
    cond, pooled = text("a ring")
    assert cond.shape == (4, 32) and pooled is None and torch.equal(cond, text("a ring")[0])
    assert not torch.equal(cond, text("a cross")[0])


def test_precision_choice():
    from comfyui_dreamcache.dreamcache_core.training.training_loop import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("no", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", cpu)
