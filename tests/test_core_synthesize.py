"""The synthetic training set without ComfyUI: captions, filters, shards, resuming, ranks, the lazy sharded manifest.

Rendering and segmentation are stand-ins here (a seeded image per row seed; masks chosen by the row's noun);
tests/test_comfy_synthesize.py runs the real pipeline and the real transformers models.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PACK_ROOT
from comfyui_dreamcache.dreamcache_core.masking import subject_filters as sf
from comfyui_dreamcache.dreamcache_core.training import synthesize as syn
from comfyui_dreamcache.dreamcache_core.training import synthetic_captions as sc
from comfyui_dreamcache.dreamcache_core.training.sharded_manifest import ShardedManifest, is_sharded
from comfyui_dreamcache.dreamcache_core.training.training_manifest import read_manifest

SIDE = 32


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

def test_generated_captions_are_many_distinct_objects_and_a_seeded_prefix_stream():
    assert sc.distinct_object_count() >= 5000
    first = list(sc.generate_captions(3000, seed=4))
    assert list(sc.generate_captions(100, seed=4)) == first[:100]
    assert list(sc.generate_captions(100, seed=5)) != first[:100]
    for caption, noun in first[:200]:
        assert noun in caption and "{" not in caption and "\t" not in caption
    # the object phrase is "a|an <adjective> <material> <noun>": count distinct ones
    words = sc.vocabulary()
    objects = set()
    for caption, noun in first:
        found = [f"{a} {m} {noun}" for a in words["adjectives"] for m in words["materials"] if f" {a} {m} {noun}" in caption]
        assert found, caption
        objects.add(found[0])
    assert len(objects) > 2500  # 3000 draws from 66,560 objects: few repeats
    assert len({noun for _, noun in first}) == len(words["objects"])


def test_captions_file_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "captions.tsv"
    assert syn.main(["captions", "--count", "50", "--seed", "2", "--out", str(path)]) == 0
    rows = list(sc.read_captions(str(path)))
    assert [(r.caption, r.noun) for r in rows] == list(sc.generate_captions(50, seed=2))
    assert [r.number for r in rows] == list(range(50)) and rows[0].line == 2  # line 1 is the comment
    bad = tmp_path / "bad.tsv"
    bad.write_text("a mug on a table\tmug\n\n# comment\na cup with no noun\n")
    with pytest.raises(sc.CaptionsFileError, match="line 4"):
        list(sc.read_captions(str(bad)))
    with pytest.raises(sc.CaptionsFileError, match="not found"):
        list(sc.read_captions(str(tmp_path / "missing.tsv")))


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------

def box_mask(fraction_side: float, side: int = 40) -> torch.Tensor:
    mask = torch.zeros(side, side)
    n = round(side * fraction_side)
    mask[:n, :n] = 1.0
    return mask


@pytest.mark.parametrize("detection,reason", [
    (sf.Detection(None), sf.NO_DETECTION),
    (sf.Detection(box_mask(0.5), score=0.2), sf.LOW_SCORE),
    (sf.Detection(torch.full((40, 40), 0.49), score=0.9), sf.EMPTY_MASK),
    (sf.Detection(box_mask(0.1), score=0.9), sf.TINY_MASK),            # 16 of 1600 pixels = 0.01
    (sf.Detection(torch.ones(40, 40), score=0.9), sf.WHOLE_IMAGE_MASK),
    (sf.Detection(box_mask(0.95)), sf.WHOLE_IMAGE_MASK),                # 38x38 = 0.9025, no score (automatic SAM)
    (sf.Detection(box_mask(0.5), score=0.9), None),
    (sf.Detection(box_mask(0.5)), None),
])
def test_each_filter_rejects_what_it_should(detection, reason):
    found = sf.rejection(detection, sf.FilterSettings(min_score=0.35, min_fraction=0.02, max_fraction=0.85))
    assert (found.reason if found else None) == reason


def test_filter_boundaries_and_bad_settings():
    settings = sf.FilterSettings(min_score=0.5, min_fraction=0.25, max_fraction=0.25)
    assert sf.rejection(sf.Detection(box_mask(0.5), score=0.5), settings) is None  # exactly 0.25, exactly 0.5
    with pytest.raises(ValueError, match="mask fractions"):
        sf.FilterSettings(min_fraction=0.5, max_fraction=0.4)


# --------------------------------------------------------------------------
# Synthesis with stand-in renderer and segmenter
# --------------------------------------------------------------------------

NOUNS = ["mug", "teapot", "nothing", "speck", "everything", "blur", "vase", "lamp", "cup", "jar", "box"]


class SeededRenderer:
    """A coloured square on a noisy background, from the row seed only (any batch)."""

    def __init__(self):
        self.calls = []

    def __call__(self, captions, seeds):
        self.calls.append(list(seeds))
        images = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            image = torch.rand(SIDE, SIDE, 3, generator=generator) * 0.3
            image[8:24, 10:26] = torch.rand(3, generator=generator)
            images.append(image)
        return torch.stack(images)


def noun_segmenter(image, noun):
    """What a detector+SAM would return, chosen by the noun so that every filter fires."""
    if noun == "nothing":
        return sf.Detection(None)
    if noun == "speck":
        mask = torch.zeros(SIDE, SIDE)
        mask[0, 0] = 1.0
        return sf.Detection(mask, 0.9)
    if noun == "everything":
        return sf.Detection(torch.ones(SIDE, SIDE), 0.9)
    if noun == "blur":
        return sf.Detection(torch.zeros(SIDE, SIDE), 0.9)
    score = 0.1 if noun == "jar" else 0.8
    mask = torch.zeros(SIDE, SIDE)
    mask[8:24, 10:26] = 1.0  # the square the renderer paints
    return sf.Detection(mask, score)


def write_captions_file(path, count):
    lines = ["# test captions"] + [f"a photo of a {NOUNS[i % len(NOUNS)]} number {i}\t{NOUNS[i % len(NOUNS)]}"
                                   for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


SETTINGS = syn.SynthesisSettings(seed=10, shard_size=4, references_per_image=2, reference_size=16,
                                 filters=sf.FilterSettings(0.35, 0.02, 0.85))


def run(captions, out, **kwargs):
    renderer = kwargs.pop("renderer", SeededRenderer())
    return syn.synthesize(captions, str(out), renderer, noun_segmenter, kwargs.pop("settings", SETTINGS),
                          log=lambda message: None, **kwargs), renderer


def folder_files(root):
    """relative path -> bytes of every file except the progress logs (their line order follows the run)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name != syn.PROGRESS_FILE:
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_synthesis_writes_rows_filters_with_reasons_and_an_index(tmp_path):
    captions = write_captions_file(tmp_path / "captions.tsv", 11)
    summary, renderer = run(captions, tmp_path / "out", batch=3)
    # rows 0..10, nouns cycle: nothing(2) speck(3) everything(4) blur(5) jar(9) are rejected, 6 kept
    assert summary.kept == 6 and summary.rows == 12
    assert dict(summary.skipped) == {sf.NO_DETECTION: 1, sf.TINY_MASK: 1, sf.WHOLE_IMAGE_MASK: 1, sf.EMPTY_MASK: 1,
                                     sf.LOW_SCORE: 1}
    # batches stay inside a shard of 4 and fill fixed slots of 3: [0,1,2] [3] | [4,5,6] [7] | [8,9,10]
    assert renderer.calls == [[10, 11, 12], [13], [14, 15, 16], [17], [18, 19, 20]]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000", "shard-00001", "shard-00002",
                                                    "synthesis.json"]
    index = json.loads((out / "index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [4, 4, 4] and index["rows"] == 12 and index["images_kept"] == 6
    assert index["images_skipped"] == {"empty mask": 1, "low detection score": 1, "no detection": 1, "tiny mask": 1,
                                       "whole-image mask": 1}
    skipped = (out / "shard-00000" / "skipped.txt").read_text().splitlines()
    assert skipped == ["00000002\tno detection: the detector found no box for the subject noun",
                       "00000003\ttiny mask: subject covers 0.0010 of the image < 0.02"]
    manifest = read_manifest(str(out / "shard-00000" / "manifest.jsonl"))
    assert not manifest.skipped
    assert [r.id for r in manifest.rows] == ["00000000_ref0", "00000000_ref1", "00000001_ref0", "00000001_ref1"]
    assert manifest.rows[2].caption == "a photo of a teapot number 1"
    assert manifest.rows[0].target.endswith(os.path.join("shard-00000", "targets", "00000000.png"))
    from PIL import Image

    with Image.open(manifest.rows[0].target) as image:
        meta = json.loads(image.text["dreamcache"])
    assert meta == {"caption": "a photo of a mug number 0", "noun": "mug", "seed": 10, "row": 0}
    progress = [json.loads(line) for line in (out / "shard-00000" / "progress.jsonl").read_text().splitlines()]
    assert [(p["number"], p["seed"], p["status"]) for p in progress] == [
        (0, 10, "kept"), (1, 11, "kept"), (2, 12, "skipped"), (3, 13, "skipped")]
    assert progress[0]["mask_fraction"] == pytest.approx(16 * 16 / SIDE ** 2)


def test_resumed_synthesis_equals_an_uninterrupted_one(tmp_path):
    captions = write_captions_file(tmp_path / "captions.tsv", 11)
    run(captions, tmp_path / "whole", batch=2)
    expected = folder_files(tmp_path / "whole")

    partial, _ = run(captions, tmp_path / "resumed", batch=2, limit=5)
    assert partial.kept + sum(partial.skipped.values()) == 5 and partial.index is None
    assert not (tmp_path / "resumed" / "index.json").exists()
    assert partial.shards_finished == ["shard-00000"]
    # a crash: a torn progress line, and a kept row whose reference file was lost
    shard1 = tmp_path / "resumed" / "shard-00001"
    with open(shard1 / syn.PROGRESS_FILE, "a") as handle:
        handle.write('{"number": 5, "stat')
    os.remove(tmp_path / "resumed" / "shard-00000" / "references" / "00000001_ref1.png")
    os.remove(tmp_path / "resumed" / "shard-00000" / "shard.json")  # the shard is open again

    resumed, renderer = run(captions, tmp_path / "resumed", batch=2)
    # row 1 is redone from its target on disk (not rendered again); rows 5..10 are rendered now
    assert resumed.resumed == 4 and resumed.rendered == 6
    assert [s for call in renderer.calls for s in call] == [15, 16, 17, 18, 19, 20]
    assert folder_files(tmp_path / "resumed") == expected
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        assert ((tmp_path / "resumed" / shard / "manifest.jsonl").read_bytes()
                == (tmp_path / "whole" / shard / "manifest.jsonl").read_bytes())


def test_two_ranks_write_disjoint_shards_whose_union_is_the_one_process_result(tmp_path, monkeypatch):
    captions = write_captions_file(tmp_path / "captions.tsv", 11)
    run(captions, tmp_path / "one", batch=3)
    expected = folder_files(tmp_path / "one")

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert syn.rank_and_world() == (0, 2)
    first, _ = run(captions, tmp_path / "two", batch=3, rank=None, world=None)  # torchrun's variables
    assert first.shards_finished == ["shard-00000", "shard-00002"] and first.index is None
    assert not (tmp_path / "two" / "shard-00001").exists()
    rank0_files = set(folder_files(tmp_path / "two"))
    second, _ = run(captions, tmp_path / "two", batch=3, rank=1, world=2)
    assert second.shards_finished == ["shard-00001"] and second.index is not None  # the last rank writes the index
    rank1_files = set(folder_files(tmp_path / "two")) - rank0_files
    assert all(f.startswith("shard-00001") for f in rank1_files - {"index.json"})
    assert first.kept + second.kept == 6 and first.rows + second.rows == 12
    assert folder_files(tmp_path / "two") == expected
    with pytest.raises(ValueError, match="rank"):
        syn.rank_and_world(2, 2)


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    captions = write_captions_file(tmp_path / "captions.tsv", 5)
    run(captions, tmp_path / "out", limit=1)
    other = syn.SynthesisSettings(seed=11, shard_size=4, references_per_image=2, reference_size=16)
    with pytest.raises(ValueError, match="other settings .*seed"):
        run(captions, tmp_path / "out", settings=other)
    write_captions_file(tmp_path / "captions.tsv", 6)
    with pytest.raises(ValueError, match="other captions"):
        run(captions, tmp_path / "out")


# --------------------------------------------------------------------------
# The trainer's view: the lazy sharded manifest
# --------------------------------------------------------------------------

def test_sharded_manifest_reads_rows_lazily_in_shard_order(tmp_path):
    captions = write_captions_file(tmp_path / "captions.tsv", 11)
    run(captions, tmp_path / "out")
    assert is_sharded(str(tmp_path / "out")) and is_sharded(str(tmp_path / "out" / "index.json"))
    assert not is_sharded(str(tmp_path / "out" / "shard-00000"))
    manifest = ShardedManifest(str(tmp_path / "out"), keep=1)
    expected = [row for shard in ("shard-00000", "shard-00001", "shard-00002")
                for row in read_manifest(str(tmp_path / "out" / shard / "manifest.jsonl")).rows]
    assert len(manifest.rows) == len(expected) == 12
    assert not manifest.rows.loaded  # nothing read until a row is asked for
    last = manifest.rows[11]
    assert list(manifest.rows.loaded) == [2]
    assert (last.index, last.id, last.target, last.reference_mask) == (11, expected[11].id, expected[11].target,
                                                                      expected[11].reference_mask)
    assert [(r.index, r.id, r.caption) for r in manifest.rows] == [(i, r.id, r.caption) for i, r in enumerate(expected)]
    assert len(manifest.rows.loaded) == 1  # keep=1: one shard in memory at a time
    with pytest.raises(IndexError):
        manifest.rows[12]

    from comfyui_dreamcache.dreamcache_core.toy.toy_world import ToyImageEncoder, ToyTextEncoder
    from comfyui_dreamcache.dreamcache_core.training.training_sources import ManifestSource

    source = ManifestSource(manifest, ToyImageEncoder(), ToyTextEncoder(), 16)
    sample = source.prepared(5)
    assert sample.caption == expected[5].caption and tuple(sample.target_latent.shape) == (4, 4, 4)
    assert sample.reference_mask is not None and float(sample.reference_mask.max()) == 1.0

    (tmp_path / "out" / "shard-00001" / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="synthesize index"):
        ShardedManifest(str(tmp_path / "out")).rows[5]


def test_index_command_and_command_line_errors(tmp_path):
    captions = write_captions_file(tmp_path / "captions.tsv", 11)
    run(captions, tmp_path / "out", rank=0, world=2)
    with pytest.raises(ValueError, match="1 shard.*shard-00001"):
        syn.main(["index", str(tmp_path / "out")])
    run(captions, tmp_path / "out", rank=1, world=2)
    os.remove(tmp_path / "out" / "index.json")
    assert syn.main(["index", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "index.json").is_file()

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "dreamcache_core.training.synthesize", *argv], cwd=str(PACK_ROOT),
                              capture_output=True, text=True, timeout=120)

    missing = cli("--captions", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: --captions {tmp_path / 'nope.tsv'} is not a file; write "
                                                   "one with `python -m dreamcache_core.training.synthesize captions --count N "
                                                   "--out captions.tsv`."]
    with pytest.raises(ValueError, match="--detector DIR --segmenter DIR"):
        syn.run_synthesis(["--captions", captions, "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="holds no config.json, so it is not a transformers Grounding-DINO folder"):
        syn.run_synthesis(["--captions", captions, "--out", str(tmp_path / "x"), "--detector", str(tmp_path / "out"),
                           "--segmenter", str(tmp_path / "out")])
    (tmp_path / "sam_folder").mkdir()
    (tmp_path / "sam_folder" / "config.json").write_text('{"model_type": "sam"}')
    with pytest.raises(ValueError, match="holds a 'sam' model, not a Grounding-DINO"):
        syn.run_synthesis(["--captions", captions, "--out", str(tmp_path / "x"), "--detector",
                           str(tmp_path / "sam_folder"), "--segmenter", str(tmp_path / "sam_folder")])
    with pytest.raises(ValueError, match="--detector needs --segmenter"):
        syn.run_synthesis(["--captions", captions, "--out", str(tmp_path / "x"), "--detector",
                           str(tmp_path / "sam_folder")])


def _synthesize_as_rank(captions, out, rank, world):
    """One rank of a multi-process synthesis (a spawned process's entry point)."""
    summary, _ = run(captions, out, batch=3, rank=rank, world=world)
    return summary.shards_finished


def test_two_concurrent_processes_write_disjoint_shards_whose_union_is_the_one_process_result(tmp_path):
    """Rank 0 and rank 1 of world 2 in two processes at the same time, into one folder (as torchrun starts them):
    disjoint shards, one index, and the union equals the one-process result byte for byte."""
    import multiprocessing

    captions = write_captions_file(tmp_path / "captions.tsv", 11)
    run(captions, tmp_path / "one", batch=3)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        finished = pool.starmap(_synthesize_as_rank, [(captions, str(tmp_path / "two"), rank, 2) for rank in (0, 1)])
    assert finished == [["shard-00000", "shard-00002"], ["shard-00001"]]
    assert folder_files(tmp_path / "two") == folder_files(tmp_path / "one")
    assert not [name for name in os.listdir(tmp_path / "two") if name.endswith(".tmp")]
