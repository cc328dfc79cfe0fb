"""Headless generation, the benchmark and K/V reuse on tiny models through ComfyUI's real sampling code.

Skipped (with the reason) when COMFYUI_PATH is unset. The checkpoint's text encoder and VAE are replaced by
tiny deterministic stand-ins (``tiny_models.tiny_pipeline``); the U-Net, Encode, Apply and the samplers are ComfyUI's.
"""
import json
import shlex

import numpy as np
import pytest
import torch

from comfyui_dreamcache.dreamcache_core.io.image_files import image_to_pil, save_png
from tiny_models import ksample, text_conditioning, tiny_pipeline, tiny_sd15_model
from run_as_comfyui import run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

SIDE = 64  # pixels: an 8x8 latent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    from comfyui_dreamcache.dreamcache_core.evaluation import generate
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    model = tiny_sd15_model(seed=0)
    unet = model.model.diffusion_model
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet)).randomize_(seed=7, scale=0.5)
    folder = tmp_path_factory.mktemp("generate_inputs")
    adapter_path = str(folder / "adapter.safetensors")
    save_adapter(adapter, adapter_path)
    generator = torch.Generator().manual_seed(3)
    reference = torch.rand(80, 72, 3, generator=generator)
    mask = torch.zeros(80, 72)
    mask[20:60, 16:56] = 1.0
    save_png(reference, str(folder / "reference.png"))
    save_png(mask, str(folder / "reference_mask.png"))
    return {"generate": generate, "pipeline": tiny_pipeline(model), "model": model, "adapter": adapter,
            "adapter_path": adapter_path, "folder": folder}


def base_argv(setup, out, *extra):
    return ["--adapter", setup["adapter_path"], "--out", str(out), "--width", str(SIDE), "--height", str(SIDE),
            "--steps", "2", "--cfg", "5.0", "--quiet", *extra]


def read_png(path):
    from PIL import Image

    with Image.open(path) as handle:
        return torch.from_numpy(np.asarray(handle.convert("RGB")).copy())


def test_settings_file_holds_every_setting_and_replays_identically(setup, tmp_path):
    from comfyui_dreamcache.dreamcache_core.io.file_hashes import file_sha256

    generate = setup["generate"]
    folder = setup["folder"]
    out = tmp_path / "first"
    argv = base_argv(setup, out, "--reference", str(folder / "reference.png"), "--reference-mask",
                     str(folder / "reference_mask.png"), "--prompt", "a photo of a toy", "--prompt", "a toy on a beach",
                     "--seed", "5", "--images-per-prompt", "2", "--batch", "2", "--sampler", "euler",
                     "--scheduler", "karras", "--strength", "0.8", "--negative", "blurry", "--subject-name", "toy")
    record = generate.main(argv, pipeline=setup["pipeline"])
    saved = json.loads((out / "settings.json").read_text())
    assert saved == json.loads(json.dumps(record))
    every_option = {a.dest for a in generate.build_parser()._actions if a.dest != "help"}
    assert every_option <= set(saved["settings"])
    s = saved["settings"]
    assert (s["steps"], s["sampler"], s["scheduler"], s["cfg"], s["strength"], s["guidance"]) == \
           (2, "euler", "karras", 5.0, 0.8, "joint")
    assert (s["width"], s["height"], s["reference_size"], s["negative"], s["encode_prompt"]) == (SIDE, SIDE, SIDE,
                                                                                                 "blurry", "")
    assert saved["seeds"] == [5, 6]
    assert saved["files"]["adapter"]["sha256"] == file_sha256(setup["adapter_path"])
    assert saved["command"] == "python -m dreamcache_core.evaluation.generate " + shlex.join(argv)
    ref = saved["references"][0]
    assert ref["mask_source"] == "mask file" and ref["reference_image"]["bytes"] > 0
    assert (out / ref["cache_file"]).is_file() and (out / ref["prepared_reference"]).is_file()
    images = saved["images"]
    assert [(i["prompt_index"], i["image_index"], i["seed"]) for i in images] == [(0, 0, 5), (0, 1, 6), (1, 0, 5),
                                                                                  (1, 1, 6)]
    assert images[2]["prompt"] == "a toy on a beach" and images[0]["batch_seeds"] == [5, 6]
    for item in images:
        assert (out / item["file"]).is_file() and item["seconds"] > 0
    first = {i["file"]: read_png(out / i["file"]) for i in images}
    assert not torch.equal(first["000_00.png"], first["000_01.png"])  # two seeds, two images

    # replaying the settings file reproduces every image bit for bit
    again = tmp_path / "again"
    generate.main(["--replay", str(out / "settings.json"), "--out", str(again), "--quiet"], pipeline=setup["pipeline"])
    for file, image in first.items():
        assert torch.equal(read_png(again / file), image), file
    # an image's noise does not depend on the batch: batch 1 gives the same pictures (up to float rounding)
    single = tmp_path / "single"
    generate.main(["--replay", str(out / "settings.json"), "--out", str(single), "--batch", "1", "--quiet"],
                  pipeline=setup["pipeline"])
    for file, image in first.items():
        assert (read_png(single / file).int() - image.int()).abs().max() <= 1, file


def test_generation_from_a_saved_cache_is_the_stock_ksampler_path(setup, tmp_path):
    from comfyui_dreamcache.dreamcache_core.io.file_hashes import file_sha256
    from comfyui_dreamcache.dreamcache_core.io.cache_files import save_cache
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import encode_reference
    from comfyui_dreamcache.nodes.apply import DreamCacheApply

    generate, pipeline, model = setup["generate"], setup["pipeline"], setup["model"]
    latent = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(9))
    cache = encode_reference(model, latent, pipeline.encode_text(""), seed=0)
    cache_path = str(tmp_path / "subject.safetensors")
    save_cache(cache, cache_path)

    out = tmp_path / "from_cache"
    record = generate.main(base_argv(setup, out, "--cache", cache_path, "--prompt", "a toy", "--seed", "11"),
                           pipeline=pipeline)
    assert record["references"][0]["cache"]["sha256"] == file_sha256(cache_path)
    generated = read_png(out / record["images"][0]["file"])

    # the same image from the nodes: Apply DreamCache + the stock KSampler (common_ksampler), same seed
    (personalised,) = run_node(DreamCacheApply, model, setup["adapter"], cache, 1.0, 0.0, 1.0, "positive only")
    samples = ksample(personalised, pipeline.encode_text("a toy"), pipeline.encode_text(""),
                      torch.zeros(1, 4, SIDE // 8, SIDE // 8), seed=11, steps=2, cfg=5.0)
    expected = image_to_pil(pipeline.decode(samples)[0])
    assert torch.equal(generated, torch.from_numpy(np.asarray(expected).copy()))

    # the unpersonalised baseline differs
    off = tmp_path / "off"
    generate.main(base_argv(setup, off, "--guidance", "off", "--prompt", "a toy", "--seed", "11"), pipeline=pipeline)
    assert not torch.equal(read_png(off / "000_00.png"), generated)


def test_combined_guidance_with_equal_scales_is_joint_guidance(setup):
    generate = setup["generate"]
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import encode_reference

    pipeline, model = setup["pipeline"], setup["model"]
    latent = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(9))
    cache = encode_reference(model, latent, pipeline.encode_text(""), seed=0)
    settings = vars(generate.build_parser().parse_args(base_argv(setup, "unused")))
    settings.update(text_cfg=5.0, image_cfg=5.0, cfg=5.0)
    positive, negative = pipeline.encode_text("a toy"), pipeline.encode_text("")
    joint = generate.Sampler(model, setup["adapter"], cache, dict(settings, guidance="joint"))
    combined = generate.Sampler(model, setup["adapter"], cache, dict(settings, guidance="combined"))
    a = joint.sample(positive, negative, [3], (4, SIDE // 8, SIDE // 8))
    b = combined.sample(positive, negative, [3], (4, SIDE // 8, SIDE // 8))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    settings.update(image_cfg=2.0)
    c = generate.Sampler(model, setup["adapter"], cache, dict(settings, guidance="combined")).sample(
        positive, negative, [3], (4, SIDE // 8, SIDE // 8))
    assert not torch.allclose(a, c, atol=1e-3)


def test_generation_refuses_what_it_cannot_do(setup, tmp_path):
    generate = setup["generate"]
    with pytest.raises(ValueError, match="at least one prompt"):
        generate.main(base_argv(setup, tmp_path / "x", "--cache", "c.safetensors"), pipeline=setup["pipeline"])
    with pytest.raises(ValueError, match="--reference IMAGE"):
        generate.main(base_argv(setup, tmp_path / "x", "--prompt", "a"), pipeline=setup["pipeline"])
    with pytest.raises(ValueError, match="multiple of 8"):
        generate.main(base_argv(setup, tmp_path / "x", "--prompt", "a", "--width", "100"), pipeline=setup["pipeline"])
    with pytest.raises(ValueError, match="must be masked"):
        dataset = tmp_path / "dataset" / "dog"
        dataset.mkdir(parents=True)
        save_png(torch.rand(16, 16, 3), str(dataset / "00.jpg"))
        generate.main(base_argv(setup, tmp_path / "x", "--dreambench", str(tmp_path / "dataset"), "--subjects", "dog",
                                "--max-prompts", "1"), pipeline=setup["pipeline"])


def test_dreambench_protocol_on_one_subject(setup, tmp_path):
    generate = setup["generate"]
    dataset = tmp_path / "dataset"
    for index in range(2):
        save_png(torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(index)),
                          str(dataset / "dog2" / f"{index:02d}.jpg"))
    masks = tmp_path / "masks"
    mask = torch.zeros(48, 48)
    mask[8:40, 12:36] = 1.0
    save_png(mask, str(masks / "dog2.png"))
    out = tmp_path / "bench"
    record = generate.main(base_argv(setup, out, "--dreambench", str(dataset), "--subjects", "dog2",
                                     "--reference-masks", str(masks), "--max-prompts", "2", "--images-per-prompt", "2",
                                     "--steps", "1"), pipeline=setup["pipeline"])
    assert [i["file"] for i in record["images"]] == ["dog2/00_00.png", "dog2/00_01.png", "dog2/01_00.png",
                                                     "dog2/01_01.png"]
    assert record["images"][0]["prompt"] == "a dog in the jungle" and record["images"][2]["prompt"] == "a dog in the snow"
    ref = record["references"][0]
    assert (ref["subject"], ref["class"], ref["kind"], ref["mask_source"]) == ("dog2", "dog", "live", "mask file")
    assert ref["reference_image"]["path"].endswith("00.jpg") and len(ref["real_images"]) == 2
    prepared = read_png(out / "dog2" / "reference.png")
    assert prepared.shape == (SIDE, SIDE, 3) and int(prepared[0, 0].min()) == 255  # subject on white
    # the evaluator reads this folder (subjects, prompts, real images) from settings.json
    from comfyui_dreamcache.dreamcache_core.evaluation.evaluate import read_generations

    read = read_generations(str(out))
    assert [i["prompt"] for i in read["images"]][:2] == ["a dog in the jungle"] * 2
    assert read["references"]["dog2"]["real_images"] == ref["real_images"]


def test_memory_kv_reuse_gives_identical_outputs_and_projects_once(setup, monkeypatch):
    from comfyui_dreamcache.dreamcache_core.method.adapter import MemoryAdapterLayer
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import encode_reference

    model = setup["model"]
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cache = encode_reference(model, latent, text_conditioning(0), seed=0)
    calls = {"project": 0, "rows": []}
    project, forward = MemoryAdapterLayer.project_memory, MemoryAdapterLayer.forward

    def counting_project(self, *args, **kwargs):
        calls["project"] += 1
        return project(self, *args, **kwargs)

    def recording_forward(self, n, *args, **kwargs):
        calls["rows"].append(n.shape[0])
        return forward(self, n, *args, **kwargs)

    monkeypatch.setattr(MemoryAdapterLayer, "project_memory", counting_project)
    monkeypatch.setattr(MemoryAdapterLayer, "forward", recording_forward)
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import attach_injection, build_injection
    from comfyui_dreamcache.dreamcache_core.method.controls import Controls

    outputs = {}
    for reuse in (True, False):
        calls.update(project=0, rows=[])
        injection = build_injection(model, setup["adapter"], cache, Controls(), (0,), reuse_memory_kv=reuse)
        personalised = attach_injection(model.clone(), injection)
        outputs[reuse] = ksample(personalised, text_conditioning(1), text_conditioning(2), torch.zeros(1, 4, 16, 16),
                                 seed=3, steps=3)
        layers = len(setup["adapter"].keys())
        # reuse: W_k R and W_v R once per layer for the whole run; without: once per layer and step
        assert calls["project"] == (layers if reuse else 3 * layers)
        # the negative chunk (apply_to positive only) is never computed: one row of the cfg batch of 2
        assert calls["rows"] == [1] * (3 * layers)
    assert torch.equal(outputs[True], outputs[False])


def test_benchmark_runs_on_a_tiny_shape_and_reports_sane_numbers(setup, tmp_path, capsys):
    from comfyui_dreamcache.dreamcache_core.evaluation import benchmark

    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    results = benchmark.main(["--shape", "tiny", "--steps", "2", "--repeats", "2", "--device", "cpu",
                              "--json", str(out_json), "--markdown", str(out_md)])
    assert len(results) == 1
    r = json.loads(out_json.read_text())["results"][0]
    assert r == json.loads(json.dumps(results[0]))
    assert r["shape"] == "tiny" and r["image_size"] == 128 and r["device"] == "cpu"
    for label in ("unpatched", "personalised"):
        runs = r["step_runs"][label]
        assert len(runs) == 2 and all(len(run) == 2 and min(run) > 0 for run in runs)
        stats = r["step_seconds"][label]
        assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert 0.2 < r["step_ratio"]["median"] < 5.0 and r["step_ratio"]["min"] <= r["step_ratio"]["max"]
    assert r["step_overhead_percent"] == pytest.approx(100 * (r["step_ratio"]["median"] - 1))
    assert r["encode_seconds"]["median"] > 0 and r["plain_pass_seconds"]["median"] > 0
    assert 0.1 < r["encode_ratio"]["median"] < 10
    # sizes follow from the shapes: tiny SD1.5 layout on a 16x16 latent (see test_comfy_pipeline)
    shapes = [(128, 2, 2), (128, 4, 4), (64, 8, 8), (64, 8, 8), (32, 16, 16)]
    assert r["cache_bytes_per_reference"] == sum(c * h * w for c, h, w in shapes) * 2  # fp16
    assert r["memory_tokens"] == sum(h * w for _, h, w in shapes)
    assert r["memory_kv_bytes"] == sum(2 * h * w * c for c, h, w in shapes) * 4  # K and V, fp32, inner = width
    assert r["adapter_bytes_fp32"] == 4 * r["adapter_parameters"] == 2 * r["adapter_bytes_fp16"]
    # counted FLOPs: the personalised step costs exactly the adapter's work on the positive row (K/V reused),
    # and the Encode pass (capture hooks) exactly one plain pass
    extra = r["step_flops"]["personalised"] - r["step_flops"]["unpatched"]
    expected = 0
    for (c, h, w), heads_x_dim in zip(shapes, (128, 128, 64, 64, 32)):
        tokens = h * w
        expected += 2 * (tokens * (2 * c * heads_x_dim + 2 * c * c) + 2 * tokens * tokens * heads_x_dim)
    assert r["adapter_step_flops_expected"] == expected
    assert extra == expected
    assert r["step_flops_ratio"] == pytest.approx(r["step_flops"]["personalised"] / r["step_flops"]["unpatched"])
    assert r["encode_flops"] == r["plain_pass_flops"] > 0
    assert r["peak_memory_bytes"]["unpatched"]["median"] >= 0
    table = out_md.read_text()
    assert "| shape |" in table and "| tiny (128px, float32) |" in table and "python -m dreamcache_core.evaluation.benchmark" in table
    assert table.strip() in capsys.readouterr().out
    # alternating order: each configuration goes first in half the pairs
    assert benchmark.ab_order(3) == ["A", "B", "B", "A", "A", "B"]
    assert benchmark.paired_ratios([[1.0, 3.0], [2.0]], [[2.0, 2.0], [3.0]]) == [1.0, 1.5]
