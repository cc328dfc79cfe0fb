"""Load DreamCache Adapter with a missing file says where it looked, what is there, where adapters come from and
where the file goes: at queue time (its validate_inputs, run as ComfyUI's executor runs it) and, should the file
vanish after queueing, when it runs. The adapter folders are replaced by temporary ones for each test."""
import pytest

from run_as_comfyui import run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)


@pytest.fixture
def adapter_folders(tmp_path, monkeypatch):
    """Two empty adapter folders (ComfyUI's models/dreamcache first, then the pack's models/), registered as
    ComfyUI's "dreamcache" folder for one test."""
    from conftest import import_comfy
    import_comfy()
    import folder_paths
    from comfyui_dreamcache.nodes.model_folders import ADAPTER_EXTENSIONS, ADAPTER_FOLDER

    folders = [tmp_path / "ComfyUI" / "models" / "dreamcache", tmp_path / "pack" / "models"]
    for folder in folders:
        folder.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, ADAPTER_FOLDER,
                        ([str(folder) for folder in folders], set(ADAPTER_EXTENSIONS)))
    return folders


def loader():
    from comfyui_dreamcache.nodes.adapter_loader import DreamCacheAdapterLoader
    return DreamCacheAdapterLoader


def assert_says_where_adapters_come_from(message, folders):
    assert f"looked in: {folders[0]}, {folders[1]}." in message
    assert "The only released adapter is the authors' SD2.1-base one (cross_attention-<step>.pt" in message
    assert "https://github.com/Emanuele97x/DreamCache" in message
    assert f"put it in {folders[0]} and use it with an SD2.1-base checkpoint" in message
    assert "Adapters for SD1.5, SDXL and their fine-tunes are trained with this pack's training script" in message
    assert "--install-as NAME.safetensors" in message


def test_an_empty_adapter_folder_refuses_the_prompt_saying_where_adapters_come_from(adapter_folders):
    with pytest.raises(ValueError) as refused:
        run_node(loader(), adapter_name="cross_attention-199999.pt")
    message = str(refused.value)
    assert message.startswith("ComfyUI refuses the prompt: DreamCacheAdapterLoader.validate_inputs says")
    assert "DreamCache adapter 'cross_attention-199999.pt' not found; looked in:" in message
    assert "There are no adapter files there." in message
    assert_says_where_adapters_come_from(message, adapter_folders)


def test_a_workflow_naming_another_adapter_is_told_which_ones_are_there(adapter_folders):
    for name in ("dreamcache_sdxl.safetensors", "cross_attention-400000.pt"):
        (adapter_folders[1] / name).write_bytes(b"")
    (adapter_folders[0] / "notes.txt").write_text("not an adapter")
    result = loader().validate_inputs(adapter_name="dreamcache_sd15.safetensors")
    assert isinstance(result, str)
    assert "Adapters there: cross_attention-400000.pt, dreamcache_sdxl.safetensors." in result
    assert "notes.txt" not in result
    assert_says_where_adapters_come_from(result, adapter_folders)
    assert loader().validate_inputs(adapter_name="dreamcache_sdxl.safetensors") is True


def test_an_adapter_gone_after_queueing_fails_with_the_same_message(adapter_folders):
    with pytest.raises(FileNotFoundError) as failed:
        loader().execute(adapter_name="cross_attention-199999.pt")
    assert "DreamCache adapter 'cross_attention-199999.pt' not found; looked in:" in str(failed.value)
    assert_says_where_adapters_come_from(str(failed.value), adapter_folders)


def test_an_adapter_in_the_folder_passes_and_loads(adapter_folders):
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.method.adapter import DreamCacheAdapter
    from core_fixtures import TINY_SIGNATURE, TINY_SPECS

    saved = DreamCacheAdapter(TINY_SPECS, TINY_SIGNATURE).randomize_(seed=3, scale=0.5)
    save_adapter(saved, str(adapter_folders[0] / "mine.safetensors"))
    adapter, info = run_node(loader(), adapter_name="mine.safetensors")
    assert adapter.keys() == saved.keys()
    for key in saved.keys():
        assert (adapter.layer(key).to_q.weight == saved.layer(key).to_q.weight).all()
    assert info.startswith("DreamCache adapter for")


def test_comfyuis_own_prompt_validation_reports_the_message(adapter_folders, monkeypatch):
    """The queue-time check as the server makes it: ComfyUI's execution.validate_inputs on a one-node prompt."""
    import asyncio

    import execution
    import nodes as comfy_nodes

    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "DreamCacheAdapterLoader", loader())
    prompt = {"1": {"class_type": "DreamCacheAdapterLoader", "inputs": {"adapter_name": "cross_attention-199999.pt"}}}
    valid, errors, _ = asyncio.run(execution.validate_inputs("dreamcache-test", prompt, "1", {}))
    assert valid is False and [error["type"] for error in errors] == ["custom_validation_failed"]
    assert errors[0]["details"].startswith("adapter_name - DreamCache adapter 'cross_attention-199999.pt' not found")
    assert_says_where_adapters_come_from(errors[0]["details"], adapter_folders)
