"""Every DreamCache node run as ComfyUI runs it (run_node: a prompt through its executor) -> declared types."""
import pytest
import torch

from run_as_comfyui import recorded_progress, run_node
from tiny_models import text_conditioning, tiny_sd15_model

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from conftest import import_comfy
    import_comfy()
    import folder_paths
    from comfyui_dreamcache import nodes as pack_nodes
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import save_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

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




def check_types(node_class, outputs):
    from comfyui_dreamcache.dreamcache_core.method.adapter import DreamCacheAdapter
    from comfyui_dreamcache.dreamcache_core.method.cache import DreamCache
    import comfy.model_patcher
    expected = {"DREAMCACHE_ADAPTER": DreamCacheAdapter, "DREAMCACHE": DreamCache,
                "MODEL": comfy.model_patcher.ModelPatcher, "IMAGE": torch.Tensor, "MASK": torch.Tensor, "STRING": str}
    assert len(outputs) == len(node_class.RETURN_TYPES)
    for value, type_name in zip(outputs, node_class.RETURN_TYPES):
        assert isinstance(value, expected[type_name]), (node_class.__name__, type_name, type(value))


def test_all_contract_nodes_are_registered_with_the_contract_inputs(env):
    from node_contract import NODE_CONTRACT, in_pack_category

    nodes = env["nodes"]
    for node_id, (required, _, returns) in NODE_CONTRACT.items():
        node_class = nodes[node_id]
        inputs = node_class.INPUT_TYPES()
        assert list(inputs["required"]) == list(required), node_id
        assert list(node_class.RETURN_TYPES) == returns, node_id
        assert in_pack_category(node_class.CATEGORY), node_id
        for name, spec in inputs["required"].items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert nodes["DreamCacheEncode"].INPUT_TYPES()["optional"]["mask"][0] == "MASK"
    assert set(nodes["DreamCacheMaskReference"].INPUT_TYPES()["optional"]) >= {"sam_model", "mask"}
    assert nodes["DreamCacheApply"].INPUT_TYPES()["required"]["strength"][1]["default"] == 1.0


def test_loader_encode_apply_save_load_chain(env):
    nodes, model = env["nodes"], env["model"]
    names = nodes["DreamCacheAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][1]["options"]
    assert "tiny_dreamcache.safetensors" in names
    loaded = run_node(nodes["DreamCacheAdapterLoader"], adapter_name="tiny_dreamcache.safetensors")
    check_types(nodes["DreamCacheAdapterLoader"], loaded)
    reference = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    encoded = run_node(nodes["DreamCacheEncode"], model=model, reference=reference, conditioning=text_conditioning(0), seed=3)
    check_types(nodes["DreamCacheEncode"], encoded)
    applied = run_node(nodes["DreamCacheApply"], model=model, adapter=loaded[0], cache=encoded[0], strength=0.8,
                   start_percent=0.0, end_percent=1.0, apply_to="positive only")
    check_types(nodes["DreamCacheApply"], applied)
    assert applied[0] is not model and applied[0].model is model.model
    saved = run_node(nodes["DreamCacheSave"], cache=encoded[0], filename_prefix="dreamcache/ref")
    filename = saved["ui"]["dreamcache"][0]["filename"]
    listed = nodes["DreamCacheLoad"].INPUT_TYPES()["required"]["cache_name"][1]["options"]
    assert filename in listed
    reloaded = run_node(nodes["DreamCacheLoad"], cache_name=filename)
    check_types(nodes["DreamCacheLoad"], reloaded)
    for key in encoded[0].keys:
        assert torch.equal(reloaded[0].features[key], encoded[0].features[key])
    assert reloaded[0].metadata == encoded[0].metadata


def test_encode_of_several_references_reports_progress_once_for_one_pass(env):
    """A batch within batch_size is one U-Net pass (bit-identical to encoding it whole): the bar over the
    references is filled once, when the pass ends, and the cache holds every reference."""
    reference = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))}
    with recorded_progress() as reports:
        (cache,) = run_node(env["nodes"]["DreamCacheEncode"], env["model"], reference, text_conditioning(0), 3)
    assert reports == [(3, 3)]
    assert cache.num_references == 3


def test_broken_adapter_file_gives_advice(env):
    with pytest.raises(ValueError, match="truncated or corrupt"):
        run_node(env["nodes"]["DreamCacheAdapterLoader"], adapter_name="broken.safetensors")


def test_nodes_of_one_prompt_sample_and_their_outputs_train_afterwards(env):
    """Loader -> Encode -> Apply -> KSampler as one prompt runs them (each node inside inference mode), twice;
    then the loaded adapter and the encoded cache are trained from outside inference mode, and the next prompt
    sees the trained weights (the memoised memory keys/values follow the parameters)."""
    from comfyui_dreamcache.dreamcache_core.training.training_loss import LossRow, denoising_losses
    from tiny_models import ksample

    nodes, model = env["nodes"], env["model"]
    adapter, _ = run_node(nodes["DreamCacheAdapterLoader"], adapter_name="tiny_dreamcache.safetensors")
    reference = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    (cache,) = run_node(nodes["DreamCacheEncode"], model, reference, text_conditioning(0), 3)
    (patched,) = run_node(nodes["DreamCacheApply"], model, adapter, cache, 1.0, 0.0, 1.0, "positive only")
    latent = torch.zeros(1, 4, 8, 8)

    def sample(m):
        return ksample(m, text_conditioning(1), text_conditioning(2), latent, seed=5, steps=2)

    plain, personalised = sample(model), sample(patched)
    assert torch.isfinite(personalised).all()
    assert (personalised - plain).abs().max() > 1e-3, "the loaded (random) adapter changed nothing"
    assert torch.equal(sample(patched), personalised), "a second prompt with the memoised memory K/V differs"

    assert not any(p.is_inference() for p in adapter.parameters()), "the loader made inference-tensor parameters"
    assert not any(t.is_inference() for t in cache.features.values()), "Encode cached inference tensors"
    adapter.requires_grad_(True)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(7)
    row = LossRow(latent=torch.randn(4, 8, 8, generator=generator), noise=torch.randn(4, 8, 8, generator=generator),
                  sigma=3.0, cond=text_conditioning(4)[0][0][0], pooled=None, cache=cache)
    loss = denoising_losses(model, adapter, [row]).mean()
    loss.backward()
    gradients = [p.grad for p in adapter.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    assert sum(float(g.abs().sum()) for g in gradients) > 0
    optimizer.step()
    adapter.requires_grad_(False)
    after_training = sample(patched)
    assert not torch.equal(after_training, personalised), "the next prompt still used the memory K/V of the old weights"
    assert torch.isfinite(after_training).all()
