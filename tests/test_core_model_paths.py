"""Model arguments without ComfyUI: a path is used as it is; a name that is no file says it was not found, where it
looked, that no ComfyUI was found to look in, and what to do."""
import pytest


def test_without_comfyui_a_path_works_and_a_name_says_comfyui_was_not_found(tmp_path, monkeypatch):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.model_files import resolve_model_file
    from comfyui_dreamcache.dreamcache_core.io.model_paths import ModelFileNotFound

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sam.pth").write_bytes(b"x")
    assert resolve_model_file("sam.pth", "sam") == "sam.pth"
    with pytest.raises(ModelFileNotFound) as missing:
        resolve_model_file("cross_attention-199999.pt", "adapter")
    message = str(missing.value)
    assert message.startswith(f"DreamCache adapter 'cross_attention-199999.pt' not found; looked in: "
                              f"{tmp_path / 'cross_attention-199999.pt'}. ComfyUI was not found")
    assert "Pass a path to the file, or a file name in ComfyUI's models/dreamcache folder" in message
    assert "put it in ComfyUI/models/dreamcache and use it with an SD2.1-base checkpoint" in message
    assert isinstance(missing.value, FileNotFoundError)


@pytest.mark.parametrize("kind, what, folder", [("checkpoint", "Checkpoint", "checkpoints"),
                                                ("adapter", "DreamCache adapter", "dreamcache"),
                                                ("sam", "SAM checkpoint", "sams")])
def test_the_message_names_the_file_every_place_and_the_target_folder(kind, what, folder):
    from comfyui_dreamcache.dreamcache_core.io.model_paths import not_found_message

    message = not_found_message(kind, "x.safetensors", ["/w/x.safetensors", f"/c/models/{folder}", "/pack/models"])
    assert message.startswith(f"{what} 'x.safetensors' not found; looked in: /w/x.safetensors, "
                              f"/c/models/{folder}, /pack/models. Pass a path to the file, or a file name in "
                              f"ComfyUI's models/{folder} folder")
    assert f"put it in /c/models/{folder}" in message or f"put one in /c/models/{folder}" in message
