"""The injection builder for a ComfyUI model (comfy_bridge.injection_builder): what an artist's Controls become on
a real ComfyUI ModelPatcher (window in sigmas, per-layer strengths, chunks, ComfyUI's attention), and how the adapter
is handed to ComfyUI's memory manager (one patcher per adapter, sized with the memory every injection holds)."""
import math

import pytest

from tiny_models import tiny_setup_with_caches

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def setup():
    return tiny_setup_with_caches(references=2)


def test_controls_become_the_injections_window_strengths_chunks_and_comfyui_attention(setup):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injection
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.attention import comfy_memory_attention
    from comfyui_dreamcache.dreamcache_core.method.controls import Controls

    model = setup["model"]
    sampling = model.get_model_object("model_sampling")
    controls = Controls(strength=0.6, start_percent=0.2, end_percent=0.7, middle_weight=0.0, decoder_weight=1.5)
    injection = build_injection(model, setup["trained"], setup["caches"][0], controls, (1,))
    assert injection.strength == 0.6 and injection.chunks == frozenset({1})
    assert injection.sigma_start == pytest.approx(float(sampling.percent_to_sigma(0.2)))
    assert injection.sigma_end == pytest.approx(float(sampling.percent_to_sigma(0.7)))
    middle = [s.key for s in setup["specs"] if s.block[0] == "middle"]
    decoder = [s.key for s in setup["specs"] if s.block[0] == "output"]
    assert middle and decoder
    assert injection.layer_strengths == {**{k: 0.0 for k in middle}, **{k: 1.5 for k in decoder}}
    assert injection.attention is comfy_memory_attention
    assert injection.managed_models == []  # not handed over unless asked (training keeps its adapter itself)

    whole = build_injection(model, setup["trained"], setup["caches"][0])  # the defaults: whole run, every layer
    assert (whole.sigma_start, whole.sigma_end) == (math.inf, 0.0) and whole.layer_strengths == {}


def test_a_memory_managed_injection_hands_over_the_adapters_one_patcher_sized_with_its_memory(setup):
    import comfy.model_management
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injection

    model, adapter = setup["model"], setup["trained"]
    first = build_injection(model, adapter, setup["caches"][0], memory_managed=True)
    assert len(first.managed_models) == 1
    patcher = first.managed_models[0]
    assert patcher.model is adapter
    dtype = model.model_dtype()
    expected = comfy.model_management.module_size(adapter) + first.device_memory_bytes(dtype)
    assert first.device_memory_bytes(dtype) > 0
    assert patcher.size == expected and first.managed_size == expected
    again = build_injection(model, adapter, setup["caches"][1], memory_managed=True)
    assert again.managed_models[0] is patcher  # one patcher per adapter, however many Applies


def test_a_reference_and_a_negative_reference_share_one_patcher_counting_both_memories(setup):
    import comfy.model_management
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injections
    from comfyui_dreamcache.dreamcache_core.method.controls import Controls

    model = setup["model"]
    positive, negative = build_injections(model, setup["trained"], setup["caches"][0], Controls(strength=0.8),
                                          negative_cache=setup["caches"][1], chunks=(0,), negative_chunks=(1,))
    assert positive.adapter is negative.adapter and negative.chunks == frozenset({1})
    assert negative.strength == 0.8 and negative.reference_mode == "shared"
    assert len(positive.managed_models) == 1 and negative.managed_models == []
    dtype = model.model_dtype()
    memories = positive.device_memory_bytes(dtype) + negative.device_memory_bytes(dtype)
    assert positive.managed_size == comfy.model_management.module_size(positive.adapter) + memories


def test_injections_of_different_adapters_are_not_handed_over_together(setup):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injection
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.injection_builder import hand_to_memory_manager

    model = setup["model"]
    one = build_injection(model, setup["trained"], setup["caches"][0])
    other = build_injection(model, setup["fresh"], setup["caches"][0])
    with pytest.raises(ValueError, match="share one adapter"):
        hand_to_memory_manager(model, [one, other])
    assert one.managed_models == [] and other.managed_models == []


def test_the_negative_reference_needs_chunks_of_its_own(setup):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injections

    with pytest.raises(ValueError, match="chunks of its own"):
        build_injections(setup["model"], setup["trained"], setup["caches"][0], negative_cache=setup["caches"][1],
                         chunks=(0,), negative_chunks=(0,))
