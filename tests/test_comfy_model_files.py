"""Model arguments of the command-line runners: a path, or a ComfyUI model name looked up in ComfyUI's folders
(checkpoints, dreamcache with the pack's models/, sams) through ComfyUI's own folder_paths; a missing one names
every place looked in. ``train --install-as`` copies the final adapter into ComfyUI's models/dreamcache.

ComfyUI's folders are replaced by temporary ones for each test (the checkout at COMFYUI_PATH is not touched).
"""
import json
import os

import pytest
import torch

import test_comfy_training
from test_comfy_training import TOY_CONTEXT, make_model

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

world = test_comfy_training.world  # the toy world fixture (one per module), shared with the training tests


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """{kind: folder} for checkpoints, dreamcache (ComfyUI's, then the pack's) and sams, registered in ComfyUI's
    folder_paths for one test; the working directory is an empty folder (a name is not a path there)."""
    from conftest import import_comfy
    import_comfy()
    import folder_paths
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.model_folders import (ADAPTER_EXTENSIONS,
                                                                               SAM_FILE_EXTENSIONS)

    folders = {"checkpoints": tmp_path / "models" / "checkpoints", "dreamcache": tmp_path / "models" / "dreamcache",
               "pack": tmp_path / "pack_models", "sams": tmp_path / "models" / "sams"}
    for folder in folders.values():
        folder.mkdir(parents=True)
    extensions = folder_paths.folder_names_and_paths["checkpoints"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(folders["checkpoints"])], extensions))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dreamcache",
                        ([str(folders["dreamcache"]), str(folders["pack"])], set(ADAPTER_EXTENSIONS)))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", ([str(folders["sams"])], set(SAM_FILE_EXTENSIONS)))
    # register_model_folders adds the real models/ folders too; keep them out of these tests
    monkeypatch.setattr("comfyui_dreamcache.dreamcache_core.comfy_bridge.model_folders.register_model_folders",
                        lambda: None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return folders


def resolve(value, kind):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.model_files import resolve_model_file
    return resolve_model_file(value, kind)


def test_a_name_is_found_in_its_comfyui_folder(comfy_folders):
    (comfy_folders["checkpoints"] / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    (comfy_folders["pack"] / "cross_attention-199999.pt").write_bytes(b"x")
    (comfy_folders["sams"] / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    assert resolve("v1-5-pruned-emaonly.safetensors", "checkpoint") == str(
        comfy_folders["checkpoints"] / "v1-5-pruned-emaonly.safetensors")
    assert resolve("cross_attention-199999.pt", "adapter") == str(comfy_folders["pack"] / "cross_attention-199999.pt")
    assert resolve("sam_vit_b_01ec64.pth", "sam") == str(comfy_folders["sams"] / "sam_vit_b_01ec64.pth")


def test_a_path_is_used_as_it_is_before_any_name(comfy_folders, tmp_path):
    (comfy_folders["checkpoints"] / "model.safetensors").write_bytes(b"in comfyui")
    (tmp_path / "work" / "model.safetensors").write_bytes(b"here")
    assert resolve("model.safetensors", "checkpoint") == "model.safetensors"  # the file in the working folder
    absolute = str(comfy_folders["sams"].parent / "elsewhere.pth")
    open(absolute, "wb").close()
    assert resolve(absolute, "sam") == absolute
    assert resolve(None, "adapter") is None


def test_a_missing_name_says_not_found_and_lists_every_folder(comfy_folders, tmp_path):
    from comfyui_dreamcache.dreamcache_core.io.model_paths import ModelFileNotFound

    with pytest.raises(ModelFileNotFound) as missing:
        resolve("nope.safetensors", "checkpoint")
    assert str(missing.value).startswith(
        f"Checkpoint 'nope.safetensors' not found; looked in: {tmp_path / 'work' / 'nope.safetensors'}, "
        f"{comfy_folders['checkpoints']}. Pass a path to the file, or a file name in ComfyUI's models/checkpoints")
    assert f"put it in {comfy_folders['checkpoints']}." in str(missing.value)

    with pytest.raises(ModelFileNotFound) as missing:
        resolve("dreamcache_sd15.safetensors", "adapter")
    message = str(missing.value)
    assert (f"DreamCache adapter 'dreamcache_sd15.safetensors' not found; looked in: "
            f"{tmp_path / 'work' / 'dreamcache_sd15.safetensors'}, {comfy_folders['dreamcache']}, "
            f"{comfy_folders['pack']}.") in message
    assert "The only released adapter is the authors' SD2.1-base one" in message
    assert f"put it in {comfy_folders['dreamcache']} and use it with an SD2.1-base checkpoint" in message

    with pytest.raises(ModelFileNotFound) as missing:
        resolve("sam_vit_h_4b8939.pth", "sam")
    assert f"looked in: {tmp_path / 'work' / 'sam_vit_h_4b8939.pth'}, {comfy_folders['sams']}." in str(missing.value)
    assert "https://github.com/facebookresearch/segment-anything" in str(missing.value)


def test_convert_authors_takes_comfyui_names(comfy_folders, tmp_path):
    """The README's converter command, with the files in ComfyUI's folders and only their names given."""
    from safetensors.torch import save_file
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.convert_authors import main
    from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec
    from core_fixtures import authors_checkpoint

    specs = [MemoryLayerSpec("middle_block.1", ("middle", 0), 128, 128, 2, 64),
             MemoryLayerSpec("output_blocks.4.1", ("output", 4), 64, 64, 1, 64)]
    torch.save(authors_checkpoint(seed=4, specs=specs), str(comfy_folders["dreamcache"] / "cross_attention-7.pt"))
    base = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(16, 4, 3, 3)}
    for spec in specs:
        block0 = f"model.diffusion_model.{spec.key}.transformer_blocks.0."
        base[block0 + "norm1.weight"] = torch.ones(spec.dim)
        base[block0 + "norm1.bias"] = torch.zeros(spec.dim)
        base[block0 + "attn2.to_k.weight"] = torch.zeros(spec.dim, 1024)
        base[f"model.diffusion_model.{spec.key}.proj_in.weight"] = torch.zeros(spec.dim, spec.channels)
    save_file(base, str(comfy_folders["checkpoints"] / "v2-1_512-ema-pruned.safetensors"))
    out = tmp_path / "converted.safetensors"
    assert main(["--adapter", "cross_attention-7.pt", "--base", "v2-1_512-ema-pruned.safetensors",
                 "--out", str(out)]) == 0
    assert list(load_adapter(str(out)).specs.values()) == specs
    assert main(["--adapter", "cross_attention-8.pt", "--base", "v2-1_512-ema-pruned.safetensors",
                 "--out", str(out)]) == 2


def test_install_adapter_copies_into_the_dreamcache_folder_and_refuses_to_overwrite(comfy_folders, tmp_path):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.model_files import adapter_install_target, install_adapter

    trained = tmp_path / "dreamcache_adapter.safetensors"
    trained.write_bytes(b"first")
    target = comfy_folders["dreamcache"] / "mine.safetensors"
    assert install_adapter(str(trained), "mine.safetensors") == str(target)
    assert target.read_bytes() == b"first"
    trained.write_bytes(b"second")
    with pytest.raises(ValueError, match=r"mine.safetensors already exists; pick another --install-as name, or add "
                                         r"--overwrite-installed to replace it"):
        install_adapter(str(trained), "mine.safetensors")
    assert target.read_bytes() == b"first"
    install_adapter(str(trained), "mine.safetensors", overwrite=True)
    assert target.read_bytes() == b"second"
    for bad in ("sub/mine.safetensors", "mine.pt", ".safetensors"):
        with pytest.raises(ValueError, match="give a file name ending in .safetensors, without folders"):
            adapter_install_target(bad)
    assert sorted(os.listdir(comfy_folders["dreamcache"])) == ["mine.safetensors"]


def test_train_installs_its_final_adapter_and_checks_the_name_before_training(world, comfy_folders, tmp_path):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import save_unet_weights
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.training.train import main

    weights = tmp_path / "unet.safetensors"
    save_unet_weights(make_model(), str(weights))
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"unet_config": tw.toy_unet_config(context_dim=TOY_CONTEXT), "prediction": "eps"}))
    out = tmp_path / "run"
    args = ["--unet-config", str(config), "--unet-weights", str(weights), "--cpu", "--toy-encoders",
            "--resolution", "32", "--batch-size", "2", "--no-progress", "--no-masks", "--steps", "1",
            "--data", str(world["manifest"].path), "--output-dir", str(out), "--install-as", "toy.safetensors"]
    assert main(args) == 0
    installed = comfy_folders["dreamcache"] / "toy.safetensors"
    assert installed.read_bytes() == (out / "dreamcache_adapter.safetensors").read_bytes()

    again = tmp_path / "again"
    with pytest.raises(ValueError, match="toy.safetensors already exists"):
        main([a if a != str(out) else str(again) for a in args])
    assert not again.exists()  # refused before training wrote anything


def test_generate_takes_the_adapter_by_its_comfyui_name_and_records_the_file(comfy_folders, tmp_path):
    """generate --adapter NAME: the adapter in ComfyUI's models/dreamcache, the same images as with its path."""
    import shutil

    from test_comfy_generate import SIDE
    from tiny_models import tiny_pipeline, tiny_sd15_model
    from comfyui_dreamcache.dreamcache_core.evaluation import generate
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.io.image_files import save_png
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    model = tiny_sd15_model(seed=0)
    unet = model.model.diffusion_model
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet)).randomize_(seed=7, scale=0.5)
    by_path = tmp_path / "adapter.safetensors"
    save_adapter(adapter, str(by_path))
    shutil.copyfile(by_path, comfy_folders["dreamcache"] / "mine.safetensors")
    save_png(torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)), str(tmp_path / "reference.png"))
    common = ["--reference", str(tmp_path / "reference.png"), "--prompt", "a toy", "--width", str(SIDE),
              "--height", str(SIDE), "--steps", "2", "--quiet"]
    pipeline = tiny_pipeline(model)
    named = generate.main(common + ["--adapter", "mine.safetensors", "--out", str(tmp_path / "named")], pipeline=pipeline)
    plain = generate.main(common + ["--adapter", str(by_path), "--out", str(tmp_path / "path")], pipeline=pipeline)
    assert named["files"]["adapter"]["path"] == str(comfy_folders["dreamcache"] / "mine.safetensors")
    assert named["files"]["adapter"]["sha256"] == plain["files"]["adapter"]["sha256"]
    first = sorted((tmp_path / "named").glob("*.png"))
    assert first and [p.read_bytes() for p in first] == [
        p.read_bytes() for p in sorted((tmp_path / "path").glob("*.png"))]
    with pytest.raises(FileNotFoundError, match="DreamCache adapter 'other.safetensors' not found; looked in:"):
        generate.main(common + ["--adapter", "other.safetensors", "--out", str(tmp_path / "x")], pipeline=pipeline)
