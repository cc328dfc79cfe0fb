"""Load DreamCache Adapter says what an adapter is for, and Apply DreamCache names both bases on a mismatch.

Tiny U-Nets with the text widths of the real families (SD1.5: 768, SDXL: 2048) on their real layer layouts;
the nodes run as ComfyUI runs them (run_node: validated inputs, inference mode)."""
import pytest
import torch

from run_as_comfyui import run_node
from tiny_models import TINY_SD15, TINY_SDXL, tiny_sd15_model, tiny_sdxl_model

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    import folder_paths
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    folder = tmp_path_factory.mktemp("adapter_info") / "dreamcache"
    folder_paths.add_model_folder_path("dreamcache", str(folder))
    sd15 = tiny_sd15_model(seed=0, config=dict(TINY_SD15, context_dim=768))
    sdxl = tiny_sdxl_model(seed=0, config=dict(TINY_SDXL, context_dim=2048))
    plain = tiny_sd15_model(seed=0)  # the tests' usual tiny model: text width 64, of no known family
    names = {}
    for family, model in (("sd15", sd15), ("sdxl", sdxl), ("tiny", plain)):
        unet = model.model.diffusion_model
        adapter = build_adapter(discover_memory_layers(unet), model_signature(unet)).randomize_(seed=2, scale=0.5)
        names[family] = f"info_{family}_dreamcache.safetensors"
        save_adapter(adapter, str(folder / names[family]))
    return {"sd15": sd15, "sdxl": sdxl, "names": names}


def load(env, family):
    from comfyui_dreamcache.nodes.adapter_loader import DreamCacheAdapterLoader

    return run_node(DreamCacheAdapterLoader, adapter_name=env["names"][family])


def test_loader_returns_the_adapter_first_and_its_info(env):
    from comfyui_dreamcache.dreamcache_core.method.adapter import DreamCacheAdapter
    from comfyui_dreamcache.nodes.adapter_loader import DreamCacheAdapterLoader

    assert list(DreamCacheAdapterLoader.RETURN_TYPES) == ["DREAMCACHE_ADAPTER", "STRING"]
    assert list(DreamCacheAdapterLoader.RETURN_NAMES) == ["adapter", "info"]
    tooltips = DreamCacheAdapterLoader.OUTPUT_TOOLTIPS
    assert len(tooltips) == 2 and all(tooltips) and "SDXL" in tooltips[1]

    adapter, info = load(env, "sdxl")
    assert isinstance(adapter, DreamCacheAdapter) and isinstance(info, str)
    lines = info.splitlines()
    assert lines[0] == "DreamCache adapter for SDXL"
    assert "text width: 2048" in lines
    assert "memory layers: 4 (middle.0, output.1, output.3, output.5)" in lines
    assert f"parameters: {adapter.parameter_count() / 1e6:.2f}M" in lines
    assert "norms: folded, ready for Apply DreamCache" in lines

    adapter, info = load(env, "sd15")
    assert info.startswith("DreamCache adapter for SD1.5\ntext width: 768\n")
    assert "memory layers: 5 (middle.0, output.4, output.6, output.8, output.10)" in info
    assert "layer widths: 128 (8 heads of 16), 64 (8 heads of 8), 32 (8 heads of 4)" in info

    _, info = load(env, "tiny")
    assert info.startswith("DreamCache adapter for an unknown base (text width 64)\n")
    assert "placed as in SD1.5/SD2.x" in info


def test_apply_of_an_sdxl_adapter_on_an_sd15_model_names_both_bases(env):
    from comfyui_dreamcache.nodes.apply import DreamCacheApply
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode

    sdxl_adapter, _ = load(env, "sdxl")
    sd15_adapter, _ = load(env, "sd15")
    model = env["sd15"]
    reference = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))}
    text = [[torch.randn(1, 8, 768, generator=torch.Generator().manual_seed(1)), {}]]
    (cache,) = run_node(DreamCacheEncode, model, reference, text, seed=0)
    run_node(DreamCacheApply, model, sd15_adapter, cache, 1.0, 0.0, 1.0, "positive only")  # its own base works
    with pytest.raises(ValueError) as error:
        run_node(DreamCacheApply, model, sdxl_adapter, cache, 1.0, 0.0, 1.0, "positive only")
    message = str(error.value)
    assert ("This DreamCache adapter was made for another base model: it was trained for SDXL (text width 2048, "
            "4 memory layers), but the model is SD1.5 (text width 768, 5 memory layers).") in message
    assert "middle.0, output.1, output.3, output.5" in message
    assert message.endswith("Load an adapter trained for SD1.5, or use an SDXL checkpoint.")


def test_sd15_adapter_on_the_tiny_sdxl_shaped_model_of_no_known_family(env):
    """The tests' usual tiny SDXL model has text width 64: an unknown base, still told apart by its layers."""
    from comfyui_dreamcache.dreamcache_core.method.adapter import check_adapter_fits
    from tiny_models import tiny_setup

    sd15_adapter, _ = load(env, "sd15")
    with pytest.raises(ValueError) as error:
        check_adapter_fits(sd15_adapter, tiny_setup("sdxl")["unet"])
    message = str(error.value)
    assert ("trained for SD1.5 (text width 768, 5 memory layers), but the model is an unknown base (text width 64, "
            "4 memory layers placed as in SDXL)") in message
    assert message.endswith("Load an adapter trained for this model's base, or use an SD1.5 checkpoint.")
