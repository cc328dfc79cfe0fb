"""Public training data without ComfyUI: the authors' layout, Subjects200K's parquet files and their preparation,
--data auto-detection, augmented references per draw and K precomputed variants, bad rows skipped with reasons.

Encoders are the toy world's fixed ones; segmentation is a colour stand-in (``data_source_fixtures``) except in
the test that runs the preparation command with tiny random Grounding-DINO + SAM folders.
"""
import json
import os
import sys

import pytest
import torch

from data_source_fixtures import (colour_segmenter, png_bytes, subjects200k_record, two_view_picture,
                                  write_authors_layout, write_subjects200k)
from comfyui_dreamcache.dreamcache_core.toy.toy_world import ToyImageEncoder, ToyTextEncoder
from comfyui_dreamcache.dreamcache_core.training import prepare_subjects200k as prep
from comfyui_dreamcache.dreamcache_core.training import subjects200k as s2
from comfyui_dreamcache.dreamcache_core.training.authors_layout import AuthorsLayout, is_authors_layout
from comfyui_dreamcache.dreamcache_core.training.data_formats import detect_data_format, open_manifest
from comfyui_dreamcache.dreamcache_core.training.reference_augmentation import AuthorsAugmentation
from comfyui_dreamcache.dreamcache_core.training.precomputed_store import PrecomputedStore
from comfyui_dreamcache.dreamcache_core.training.sample_draws import draw_sample
from comfyui_dreamcache.dreamcache_core.training.training_sources import ManifestSource, StoreSource, precompute

pytest.importorskip("pyarrow")

SIZE = 32


def toy_source(manifest, augment=True, cut_out=True, log=None):
    messages = [] if log is None else log
    source = ManifestSource(manifest, ToyImageEncoder(), ToyTextEncoder(32), SIZE, augment=AuthorsAugmentation()
                            if augment else None, cut_out=cut_out, log=messages.append)
    return source, messages


# --------------------------------------------------------------------------
# The authors' layout
# --------------------------------------------------------------------------

@pytest.fixture
def authors(tmp_path):
    from comfyui_dreamcache.dreamcache_core.io.image_files import save_png

    root = tmp_path / "authors"
    made = write_authors_layout(str(root), objects=3, stems=2)
    broken = root / "object_009"
    broken.mkdir()
    image = torch.full((16, 16, 3), 0.4)
    save_png(image, str(broken / "a_generation.png"))           # no mask
    (broken / "a_caption.txt").write_text("a lamp")
    save_png(image, str(broken / "b_generation.png"))           # no caption
    save_png(torch.ones(16, 16), str(broken / "b_mask.png"))
    (broken / "c_generation.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt image
    save_png(torch.ones(16, 16), str(broken / "c_mask.png"))
    (broken / "c_caption.txt").write_text("a broken vase")
    save_png(image, str(broken / "d_generation.png"))           # empty caption
    save_png(torch.ones(16, 16), str(broken / "d_mask.png"))
    (broken / "d_caption.txt").write_text("  \n")
    save_png(image, str(broken / "e_generation.png"))           # empty mask
    save_png(torch.zeros(16, 16), str(broken / "e_mask.png"))
    (broken / "e_caption.txt").write_text("a cup")
    (root / "notes.txt").write_text("not a triplet")
    return {"root": root, "made": made}


def test_authors_layout_is_scanned_into_rows_and_says_why_it_skips(authors):
    layout = AuthorsLayout(str(authors["root"]))
    assert len(layout.rows) == 6 + 3  # 6 good triplets and the three broken only when read
    assert [row.id for row in layout.skipped] == ["object_009/a", "object_009/b"]
    assert "no mask (a_mask.png missing)" in layout.skipped[0].reason
    assert "no caption (b_caption.txt missing)" in layout.skipped[1].reason
    row = layout.rows[0]
    folder, stem, caption = authors["made"][0]
    assert row.target == row.reference == str(authors["root"] / folder / f"{stem}_generation.png")
    assert row.reference_mask == str(authors["root"] / folder / f"{stem}_mask.png") and row.caption == caption
    assert "9 triplets in 4 object folders, 2 skipped" in layout.report()
    assert is_authors_layout(str(authors["root"])) and detect_data_format(str(authors["root"])) == "authors"


def test_rows_broken_when_read_are_skipped_with_reasons_and_replaced_by_the_next(authors):
    layout = AuthorsLayout(str(authors["root"]))
    source, messages = toy_source(layout)
    names = [layout.rows.name(i) for i in range(len(layout.rows))]
    corrupt, empty_caption, empty_mask = (names.index(f"object_009/{s}") for s in "cde")
    first_good = source.prepared(0)
    for broken in (corrupt, empty_caption, empty_mask):
        sample = source.prepared(broken)  # the next usable row, wrapping round to row 0
        assert torch.equal(sample.target_latent, first_good.target_latent)
    report = source.skip_report()
    assert "3 row(s) skipped" in report
    assert "image file" in source.skipped[corrupt] or "cannot identify" in source.skipped[corrupt]
    assert "caption is empty" in source.skipped[empty_caption]
    assert "marks no subject" in source.skipped[empty_mask]
    assert len(messages) == 3  # each reported once, however often it is drawn
    source.prepared(corrupt)
    assert len(messages) == 3


def test_authors_reference_is_the_target_cut_out_and_augmented_per_draw(authors):
    layout = AuthorsLayout(str(authors["root"]))
    source, _ = toy_source(layout)
    draws = [draw_sample(0, d, len(layout.rows), 0.0, 0.0) for d in range(40)]
    by_index = {}
    for draw in draws:
        by_index.setdefault(draw.index, []).append(draw)
    index, repeated = next((i, d) for i, d in by_index.items() if len(d) >= 2 and i < 6)
    first, second = (source.prepared(index, d) for d in repeated[:2])
    assert torch.equal(first.target_latent, second.target_latent) and torch.equal(first.text_cond, second.text_cond)
    assert not torch.equal(first.reference_latent, second.reference_latent)  # a fresh augmentation per draw
    assert torch.equal(source.prepared(index, repeated[0]).reference_latent, first.reference_latent)  # reproducible
    # without a draw: the canonical cut-out (the subject on white, no background from the photo)
    canonical = source.prepared(index)
    white = ToyImageEncoder()(torch.ones(SIZE, SIZE, 3))
    assert not torch.equal(canonical.reference_latent, white)
    plain, _ = toy_source(layout, augment=False)
    assert torch.equal(plain.prepared(index, repeated[0]).reference_latent, canonical.reference_latent)


# --------------------------------------------------------------------------
# Precomputed variants
# --------------------------------------------------------------------------

def test_precompute_stores_k_variants_and_draws_pick_them_reproducibly(authors, tmp_path):
    layout = AuthorsLayout(str(authors["root"]))
    source, _ = toy_source(layout)
    store_dir = tmp_path / "store"
    precompute(source, str(store_dir), None, caches=False, progress=False, log=lambda m: None, variants=3)
    store = PrecomputedStore(str(store_dir))
    assert store.reference_variants == 3 and len(store) == len(layout.rows)
    assert store.info["source"]["augment"] == "authors"
    variants = [store.read_sample(0, v) for v in range(3)]
    assert all(torch.equal(v.target_latent, variants[0].target_latent) for v in variants)
    assert len({v.reference_latent.sum().item() for v in variants}) == 3  # three different augmentations
    for number, variant in enumerate(variants):
        assert torch.equal(variant.reference_latent, source.prepared(0, variant=number).reference_latent)
    with pytest.raises(ValueError, match="holds 3 reference variant"):
        store.read_sample(0, 3)
    stored = StoreSource(store)
    draws = [draw_sample(1, d, len(stored), 0.0, 0.0) for d in range(600)]
    picked = [stored.variant_of(d) for d in draws]
    assert picked == [stored.variant_of(d) for d in draws]
    assert all(abs(picked.count(v) / 600 - 1 / 3) < 5 * (2 / 9 / 600) ** 0.5 for v in range(3))
    chosen = stored.prepared(draws[0].index, draws[0])
    assert torch.equal(chosen.reference_latent, store.read_sample(draws[0].index, picked[0]).reference_latent)
    with pytest.raises(ValueError, match="needs augmented references"):
        precompute(toy_source(layout, augment=False)[0], str(tmp_path / "x"), None, progress=False,
                   log=lambda m: None, variants=2)


def test_store_without_variants_reads_as_before(tmp_path):
    from comfyui_dreamcache.dreamcache_core.training.precomputed_store import PreparedSample

    store = PrecomputedStore(str(tmp_path / "s"))
    sample = PreparedSample(torch.randn(4, 2, 2), torch.randn(4, 2, 2), torch.randn(3, 8), None, torch.rand(8, 8))
    store.write_sample(0, sample)
    store.write_info(1, False)
    back = store.read_sample(0)
    assert torch.equal(back.reference_latent, sample.reference_latent) and store.reference_variants == 1
    assert StoreSource(store).prepared(0, draw_sample(0, 0, 1, 0.0, 0.0)).reference_mask is not None


# --------------------------------------------------------------------------
# Subjects200K
# --------------------------------------------------------------------------

def test_views_are_found_from_the_real_size():
    assert s2.view_boxes(1056, 528) == ((8, 8, 520, 520), (528, 8, 1040, 520))  # OminiControl's crops
    assert s2.view_boxes(132, 66) == ((1, 1, 65, 65), (66, 1, 130, 65))
    picture = two_view_picture((0.9, 0.1, 0.1), tile=512)
    assert tuple(picture.shape) == (528, 1056, 3)
    left, right = s2.split_views(s2.decode_picture(png_bytes(picture)))
    assert left.shape == right.shape == (512, 512, 3)
    assert bool((left[0] < 0.99).any()) and bool((left[:, 0] < 0.99).any())  # no white frame left inside
    assert bool((right[0] < 0.99).any()) and bool((right[:, -1] < 0.99).any())
    with pytest.raises(ValueError, match="unexpected layout: the picture is 600x528"):
        s2.view_boxes(600, 528)


@pytest.fixture
def parquet(tmp_path):
    folder = tmp_path / "Subjects200K" / "data"
    good = [subjects200k_record(n) for n in range(4)]
    records = good + [
        subjects200k_record(4, quality=(5, 4, 5)),                                     # 4: low quality
        subjects200k_record(5, image=b"\x89PNG\r\n\x1a\nbroken"),                     # 5: corrupt image
        subjects200k_record(6, descriptions=("a toy on a shelf", "")),               # 6: one empty caption
        {**subjects200k_record(7), "description": None},                            # 7: malformed row
        subjects200k_record(8, valid=False),                                         # 8: invalid description
        subjects200k_record(9, image=png_bytes(torch.ones(40, 100, 3))),             # 9: not two square views
        subjects200k_record(10),
    ]
    write_subjects200k(folder / "train-00000-of-00002.parquet", records[:6])
    write_subjects200k(folder / "train-00001-of-00002.parquet", records[6:])
    (folder / "train-00002-of-00002.parquet").write_bytes(b"PAR1 this is not parquet")
    return folder


def test_parquet_rows_stream_by_row_group_with_reasons(parquet):
    files = s2.survey(str(parquet))
    assert [f.rows for f in files] == [6, 5, 0] and files[0].row_groups == (2, 2, 2)
    assert "cannot be read as parquet" in files[2].problem
    rows = list(s2.iter_rows(files))
    assert [r.number for r in rows] == list(range(11))
    assert isinstance(rows[7], s2.BadRow) and "no description" in rows[7].reason
    assert rows[0].descriptions == ("a toy 0 on a shelf, left view", "a toy 0 in a garden, right view")
    assert rows[4].quality == (5, 4, 5) and rows[0].item == "toy" and rows[0].collection == "collection_1"
    assert [r.number for r in s2.iter_rows(files, lambda n: n in (3, 9))] == [3, 9]
    assert detect_data_format(str(parquet.parent)) == "subjects200k"
    with pytest.raises(ValueError, match="no subject masks. Cut the references out once"):
        open_manifest(str(parquet.parent), "subjects200k")


def test_a_damaged_row_group_is_skipped_with_its_reason_and_the_rest_is_read(tmp_path):
    import pyarrow.parquet as pq

    path = write_subjects200k(tmp_path / "data" / "train.parquet", [subjects200k_record(n) for n in range(6)])
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(open(path, "rb").read())
    for offset in range(column.data_page_offset, column.data_page_offset + 40):  # break row group 1's image page
        data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))
    rows = list(s2.iter_rows(s2.survey(str(tmp_path / "data"))))
    assert [type(r).__name__ for r in rows] == ["PairRow", "PairRow", "BadRow", "BadRow", "PairRow", "PairRow"]
    assert rows[2].reason.startswith("unreadable row (row group 1 of train.parquet")
    summary = prep.run_preparation(prepare_argv(tmp_path / "data", tmp_path / "out"), segmenter=colour_segmenter(),
                                   log=lambda m: None)
    assert summary.kept == 4 and dict(summary.skipped) == {"unreadable row": 2} and summary.index is not None


def test_missing_pyarrow_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="pip install pyarrow"):
        s2.import_parquet()


def prepare_argv(parquet, out, *extra):
    return ["--parquet", str(parquet), "--out", str(out), "--shard-size", "4", "--reference-size", "32",
            "--quiet", "--min-mask-fraction", "0.01", *extra]


def shard_contents(out):
    """Every file of the prepared folder but progress.jsonl (whose line order follows the run), as bytes."""
    found = {}
    for directory, _, names in os.walk(out):
        for name in names:
            if name not in ("progress.jsonl", "prepare.json"):
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, out)] = handle.read()
    return found


def test_preparation_writes_a_sharded_manifest_with_reasons_that_train_reads(parquet, tmp_path):
    out = tmp_path / "prepared"
    summary = prep.run_preparation(prepare_argv(parquet, out), segmenter=colour_segmenter(), log=lambda m: None)
    assert summary.kept == 6 and summary.rows == 11 and summary.index is not None, summary.text()
    assert dict(summary.skipped) == {"low quality": 1, "corrupt image": 1, "malformed row": 1,
                                     "invalid description": 1, "unexpected layout": 1}
    assert dict(summary.directions) == {"empty caption": 1}
    assert "files skipped: train-00002-of-00002.parquet" in summary.text()
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "subjects200k" and index["min_quality"] == 5 and index["rows"] == 11
    assert detect_data_format(str(out)) == "subjects200k"
    skipped = (out / "shard-00001" / "skipped.txt").read_text()
    assert "00000004\tlow quality: compositeStructure 5, objectConsistency 4" in skipped
    assert "00000006 view 0 -> 1\tempty caption" in skipped
    manifest = open_manifest(str(out), "subjects200k")
    rows = list(manifest.rows)
    assert [r.id for r in rows[:2]] == ["00000000_0to1", "00000000_1to0"]
    # reference = one view cut out on white, target = the other view with its own caption
    assert rows[0].caption == "a toy 0 in a garden, right view" and rows[0].target.endswith("00000000_1.png")
    assert rows[0].reference.endswith("references/00000000_0.png")
    source, _ = toy_source(manifest, augment=True, cut_out=False)
    assert source.prepared(0, draw_sample(0, 0, len(rows), 0, 0)).reference_mask is not None
    with pytest.raises(ValueError, match="asks for better rows"):
        open_manifest(str(out), "subjects200k", min_quality=5.5)
    lower = prep.run_preparation(prepare_argv(parquet, tmp_path / "q4", "--min-quality", "4"),
                                 segmenter=colour_segmenter(), log=lambda m: None)
    assert lower.kept == 7 and "low quality" not in lower.skipped
    with pytest.raises(ValueError, match="started with other settings"):
        prep.run_preparation(prepare_argv(parquet, out, "--min-quality", "3"), segmenter=colour_segmenter(),
                             log=lambda m: None)


def test_preparation_resumes_and_ranks_split_to_the_one_process_result(parquet, tmp_path):
    whole = tmp_path / "whole"
    prep.run_preparation(prepare_argv(parquet, whole), segmenter=colour_segmenter(), log=lambda m: None)
    expected = shard_contents(whole)

    interrupted = tmp_path / "interrupted"
    first = prep.run_preparation(prepare_argv(parquet, interrupted, "--limit", "3"), segmenter=colour_segmenter(),
                                 log=lambda m: None)
    assert first.index is None and not (interrupted / "index.json").exists()
    second = prep.run_preparation(prepare_argv(parquet, interrupted), segmenter=colour_segmenter(), log=lambda m: None)
    assert second.resumed == 3 and second.index is not None
    assert shard_contents(interrupted) == expected

    ranks = tmp_path / "ranks"
    summaries = [prep.run_preparation(prepare_argv(parquet, ranks, "--rank", str(r), "--world-size", "2"),
                                      segmenter=colour_segmenter(), log=lambda m: None) for r in (0, 1)]
    assert summaries[0].shards_finished == ["shard-00000", "shard-00002"]
    assert summaries[1].shards_finished == ["shard-00001"]
    assert summaries[0].index is None and summaries[1].index is not None  # the last rank to finish writes it
    assert shard_contents(ranks) == expected


def test_preparation_with_tiny_grounding_dino_and_sam_folders(tmp_path):
    pytest.importorskip("transformers")
    from tiny_vision_models import write_tiny_grounding_dino, write_tiny_sam

    folder = tmp_path / "parquet"
    write_subjects200k(folder / "train.parquet", [subjects200k_record(n) for n in range(2)])
    detector = write_tiny_grounding_dino(str(tmp_path / "gdino"), nouns=["toy"])
    sam = write_tiny_sam(str(tmp_path / "sam"))
    out = tmp_path / "prepared"
    summary = prep.run_preparation(prepare_argv(folder, out, "--detector", detector, "--segmenter", sam, "--device",
                                                "cpu", "--min-score", "0", "--max-mask-fraction", "1.0",
                                                "--min-mask-fraction", "0"), log=lambda m: None)
    assert summary.index is not None and summary.kept + sum(summary.skipped.values()) == 2
    records = [json.loads(line) for line in (out / "shard-00000" / "progress.jsonl").read_text().splitlines()]
    for record in records:  # every view was segmented by the random detector (a real score) and SAM
        for view in record.get("views", []):
            assert 0.0 <= view["score"] <= 1.0 and view["mask_fraction"] is not None
    settings = json.loads((out / "prepare.json").read_text())["settings"]
    assert settings["segmenter"]["kind"] == "grounding-dino+sam"
