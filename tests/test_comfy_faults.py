"""Faults through the nodes as ComfyUI runs them: huge numbers arriving through links (which ComfyUI's queue-time
validate_inputs never sees) are refused by the node with the same message a widget gets, the documented ranges
keep the sampled latent finite, a Save prefix too long for the file system is refused naming it, and Reference
Noise's blur reports progress. Skipped (with the reason) when COMFYUI_PATH is unset."""
import pytest
import torch

from run_as_comfyui import in_prompt, recorded_progress, run_node
from tiny_models import ksample, text_conditioning, tiny_setup

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)


@pytest.fixture(scope="module")
def env():
    setup = tiny_setup()
    from comfyui_dreamcache.nodes import apply, cache_files, combine, encode, guider, reference_noise

    reference = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    (cache,) = run_node(encode.DreamCacheEncode, setup["model"], reference, text_conditioning(0), seed=0)
    return dict(setup, cache=cache, Apply=apply.DreamCacheApply, Guider=guider.DreamCacheGuider,
                Combine=combine.DreamCacheCombine, Save=cache_files.DreamCacheSave,
                Noise=reference_noise.DreamCacheReferenceNoise)


def run_linked(node_class, **inputs):
    """The node run with ``inputs`` arriving through links: ComfyUI calls no validate_inputs and checks no min/max
    for a linked value; the executor calls the V3 node's execute inside inference mode."""
    with in_prompt():
        return node_class.execute(**inputs)


@pytest.mark.parametrize("node, name, value, match", [
    ("Apply", "strength", 1e30, r"strength is 1e\+30, outside its range. Set it to a number between 0 and 2"),
    ("Apply", "strength", -1.0, r"strength is -1.0, outside its range"),
    ("Apply", "middle_weight", 1e30, r"middle_weight is 1e\+30, outside its range"),
    ("Apply", "end_percent", 3.0, r"end_percent is 3.0, outside its range"),
    ("Guider", "text_cfg", 1e30, r"text_cfg is 1e\+30, outside its range. Set it to a number between 0 and 100"),
    ("Guider", "image_cfg", 1e30, r"image_cfg is 1e\+30, outside its range"),
    ("Combine", "weight_1", 1e30, r"weight_1 is 1e\+30, outside its range"),
    ("Noise", "strength", 1e30, r"strength is 1e\+30, outside its range. Set it to a number between 0 and 1"),
])
def test_huge_numbers_through_links_are_refused_like_widget_values(env, node, name, value, match):
    inputs = {
        "Apply": dict(model=env["model"], adapter=env["trained"], cache=env["cache"], strength=1.0, start_percent=0.0,
                      end_percent=1.0, apply_to="positive only"),
        "Guider": dict(model=env["model"], adapter=env["trained"], cache=env["cache"], positive=text_conditioning(1),
                       negative=text_conditioning(2), text_cfg=7.5, image_cfg=5.0),
        "Combine": dict(cache_1=env["cache"], cache_2=env["cache"], weight_1=1.0, weight_2=1.0),
        "Noise": dict(image=torch.rand(1, 16, 16, 3), mode="blur", strength=0.5, seed=0),
    }[node]
    node_class = env[node]
    assert node_class.validate_inputs() is True  # what ComfyUI checks of a prompt whose numbers are all linked
    inputs[name] = value
    with pytest.raises(ValueError, match=match):
        run_linked(node_class, **inputs)
    # the same value typed into the widget gets the same message at queue time
    widget = node_class.validate_inputs(**{name: value})
    assert widget is not True and __import__("re").search(match, widget)


def test_the_largest_documented_settings_sample_a_finite_latent(env):
    """strength 2, every layer weight 100 and a frame weight of 100 multiply to 20000 on the adapter's change:
    still finite (the ranges hold the path away from overflow)."""
    (model,) = run_node(env["Apply"], env["model"], env["trained"], env["cache"], 2.0, 0.0, 1.0,
                        "positive and negative", layer_weights="middle=100, decoder=100", frame_weights="100")
    latent = ksample(model, text_conditioning(1), text_conditioning(2), torch.zeros(1, 4, 8, 8), seed=1, cfg=100.0)
    assert bool(torch.isfinite(latent).all())


def test_a_save_prefix_too_long_for_the_file_system_is_refused_naming_it(env, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    prefix = "dreamcache/" + "r" * 300
    message = env["Save"].validate_inputs(filename_prefix=prefix)
    assert message.startswith("filename_prefix is too long for the file system: its file name part 'rrrr")
    assert "at most 255 bytes per name" in message
    with pytest.raises(ValueError, match="filename_prefix is too long for the file system"):
        run_linked(env["Save"], cache=env["cache"], filename_prefix=prefix)
    assert env["Save"].validate_inputs(filename_prefix="dreamcache/" + "r" * 230) is True
    run_node(env["Save"], env["cache"], "dreamcache/" + "r" * 230)
    assert len(list((tmp_path / "dreamcache").iterdir())) == 1


def test_reference_noise_blur_reports_progress_per_image(env):
    with recorded_progress() as reports:
        (out,) = run_node(env["Noise"], torch.rand(3, 32, 32, 3), "blur", 1.0, 0)
    assert reports[-1] == (3, 3) and len(reports) == 3 and out.shape == (3, 32, 32, 3)


def adapter_entries(adapter):
    """Entries of ComfyUI's current_loaded_models that belong to ``adapter``: live ones (their patcher wraps it) and
    dead ones (the patcher is gone, the loaded module is still the adapter)."""
    import comfy.model_management

    count = 0
    for entry in comfy.model_management.current_loaded_models:
        patcher = entry.model
        real = entry.real_model() if entry.real_model is not None else None
        if (patcher is not None and patcher.model is adapter) or real is adapter:
            count += 1
    return count


def test_re_queued_applies_leave_one_loaded_model_entry_for_the_adapter_and_the_same_result(env):
    """Ten prompts of Apply + KSampler, as re-queues run them (each Apply's output dropped afterwards), with
    ComfyUI's unload_all_models between: at most one entry for the adapter in current_loaded_models, always the
    same patcher, and the same latent every time."""
    import gc

    import comfy.model_management

    adapter, results, patchers = env["trained"], [], set()
    for _ in range(10):
        (model,) = run_node(env["Apply"], env["model"], adapter, env["cache"], 1.0, 0.0, 1.0, "positive only")
        (patcher,) = [m for p in model.model_options["transformer_options"]["patches"]["attn1_output_patch"]
                      for m in p.models()]
        patchers.add(id(patcher))
        results.append(ksample(model, text_conditioning(1), text_conditioning(2), torch.zeros(1, 4, 8, 8), seed=2))
        assert adapter_entries(adapter) == 1
        del model, patcher
        gc.collect()
        comfy.model_management.unload_all_models()
        assert adapter_entries(adapter) <= 1
    assert len(patchers) == 1
    assert all(torch.equal(result, results[0]) for result in results)
