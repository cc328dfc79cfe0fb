"""Every DreamCache node called as ComfyUI calls it: getattr(node, FUNCTION)(**inputs) -> declared types."""
import pytest
import torch

from tiny_models import text_conditioning, tiny_sd15_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    import folder_paths
    from comfyui_dreamcache import nodes as pack_nodes
    from comfyui_dreamcache.dreamcache_core.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.layers import discover_memory_layers, model_signature

    root = tmp_path_factory.mktemp("comfy_files")
    adapters = root / "dreamcache"
    folder_paths.add_model_folder_path("dreamcache", str(adapters))
    previous_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(root / "output"))
    pack_nodes.register_model_folders()  # the output folder for caches follows the new output directory
    model = tiny_sd15_model(seed=0)
    unet = model.model.diffusion_model
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet)).randomize_(seed=2, scale=0.5)
    save_adapter(adapter, str(adapters / "tiny_dreamcache.safetensors"))
    (adapters / "broken.safetensors").write_bytes(b"not a safetensors file")
    yield {"model": model, "nodes": pack_nodes.NODE_CLASS_MAPPINGS, "root": root}
    folder_paths.set_output_directory(previous_output)


def call(node_class, **inputs):
    node = node_class()
    return getattr(node, node_class.FUNCTION)(**inputs)


def check_types(node_class, outputs):
    from comfyui_dreamcache.dreamcache_core.adapter import DreamCacheAdapter
    from comfyui_dreamcache.dreamcache_core.cache import DreamCache
    import comfy.model_patcher
    expected = {"DREAMCACHE_ADAPTER": DreamCacheAdapter, "DREAMCACHE": DreamCache,
                "MODEL": comfy.model_patcher.ModelPatcher, "IMAGE": torch.Tensor, "MASK": torch.Tensor}
    assert len(outputs) == len(node_class.RETURN_TYPES)
    for value, type_name in zip(outputs, node_class.RETURN_TYPES):
        assert isinstance(value, expected[type_name]), (node_class.__name__, type_name, type(value))


def test_all_seven_nodes_are_registered_with_the_contract_inputs(env):
    nodes = env["nodes"]
    contract = {
        "DreamCacheAdapterLoader": (["adapter_name"], ("DREAMCACHE_ADAPTER",)),
        "DreamCacheSAMLoader": (["model_name", "device"], ("SAM_MODEL",)),
        "DreamCacheMaskReference": (["image", "size"], ("IMAGE", "MASK")),
        "DreamCacheEncode": (["model", "reference", "conditioning", "seed"], ("DREAMCACHE",)),
        "DreamCacheApply": (["model", "adapter", "cache", "strength", "start_percent", "end_percent", "apply_to"], ("MODEL",)),
        "DreamCacheSave": (["cache", "filename_prefix"], ()),
        "DreamCacheLoad": (["cache_name"], ("DREAMCACHE",)),
    }
    for node_id, (required, returns) in contract.items():
        node_class = nodes[node_id]
        inputs = node_class.INPUT_TYPES()
        assert list(inputs["required"]) == required, node_id
        assert tuple(node_class.RETURN_TYPES) == returns, node_id
        assert node_class.CATEGORY == "DreamCache"
        for name, spec in inputs["required"].items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert nodes["DreamCacheEncode"].INPUT_TYPES()["optional"]["mask"][0] == "MASK"
    assert set(nodes["DreamCacheMaskReference"].INPUT_TYPES()["optional"]) >= {"sam_model", "mask"}
    assert nodes["DreamCacheApply"].INPUT_TYPES()["required"]["strength"][1]["default"] == 1.0


def test_loader_encode_apply_save_load_chain(env):
    nodes, model = env["nodes"], env["model"]
    names = nodes["DreamCacheAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][0]
    assert "tiny_dreamcache.safetensors" in names
    loaded = call(nodes["DreamCacheAdapterLoader"], adapter_name="tiny_dreamcache.safetensors")
    check_types(nodes["DreamCacheAdapterLoader"], loaded)
    reference = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    encoded = call(nodes["DreamCacheEncode"], model=model, reference=reference, conditioning=text_conditioning(0), seed=3)
    check_types(nodes["DreamCacheEncode"], encoded)
    applied = call(nodes["DreamCacheApply"], model=model, adapter=loaded[0], cache=encoded[0], strength=0.8,
                   start_percent=0.0, end_percent=1.0, apply_to="positive only")
    check_types(nodes["DreamCacheApply"], applied)
    assert applied[0] is not model and applied[0].model is model.model
    saved = call(nodes["DreamCacheSave"], cache=encoded[0], filename_prefix="dreamcache/ref")
    filename = saved["ui"]["dreamcache"][0]["filename"]
    listed = nodes["DreamCacheLoad"].INPUT_TYPES()["required"]["cache_name"][0]
    assert filename in listed
    reloaded = call(nodes["DreamCacheLoad"], cache_name=filename)
    check_types(nodes["DreamCacheLoad"], reloaded)
    for key in encoded[0].keys:
        assert torch.equal(reloaded[0].features[key], encoded[0].features[key])
    assert reloaded[0].metadata == encoded[0].metadata


def test_broken_adapter_file_gives_advice(env):
    with pytest.raises(ValueError, match="truncated or corrupt"):
        call(env["nodes"]["DreamCacheAdapterLoader"], adapter_name="broken.safetensors")
