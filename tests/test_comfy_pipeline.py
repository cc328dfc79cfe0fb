"""Encode -> Apply -> stock KSampler on a tiny SD1.5-shaped U-Net, through ComfyUI's real code.

Skipped (with the reason) when COMFYUI_PATH is unset.
"""
import pytest
import torch

from tiny_models import ksample, text_conditioning, tiny_sd15_model, tiny_setup
from run_as_comfyui import run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

LATENT = 16  # 16x16 latent = 128 px image


@pytest.fixture(scope="module")
def setup():
    setup = tiny_setup()
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    reference = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(5))}
    (cache,) = run_node(DreamCacheEncode, setup["model"], reference, text_conditioning(0), seed=0)
    return dict(setup, cache=cache, reference=reference)


def apply(setup, adapter, strength=1.0, start=0.0, end=1.0, apply_to="positive only"):
    from comfyui_dreamcache.nodes.apply import DreamCacheApply

    (model,) = run_node(DreamCacheApply, setup["model"], adapter, setup["cache"], strength, start, end, apply_to)
    return model


def sample(model, seed=11):
    empty = torch.zeros(1, 4, LATENT, LATENT)
    return ksample(model, text_conditioning(1), text_conditioning(2), empty, seed=seed)


def test_encode_caches_exactly_the_five_memory_layers(setup):
    cache = setup["cache"]
    assert [s.key for s in setup["specs"]] == ["middle_block.1", "output_blocks.4.1", "output_blocks.6.1",
                                               "output_blocks.8.1", "output_blocks.10.1"]
    assert [s.block for s in setup["specs"]] == [("middle", 0), ("output", 4), ("output", 6), ("output", 8), ("output", 10)]
    expected = {"middle_block.1": (1, 128, 2, 2), "output_blocks.4.1": (1, 128, 4, 4),
                "output_blocks.6.1": (1, 64, 8, 8), "output_blocks.8.1": (1, 64, 8, 8),
                "output_blocks.10.1": (1, 32, 16, 16)}
    assert {k: tuple(v.shape) for k, v in cache.features.items()} == expected
    assert all(v.dtype == torch.float16 and v.device.type == "cpu" for v in cache.features.values())
    assert cache.metadata["timestep"] == 1 and cache.metadata["latent_size"] == [LATENT, LATENT]
    model_sampling = setup["model"].get_model_object("model_sampling")
    assert cache.metadata["sigma"] == pytest.approx(float(model_sampling.sigmas[1]), rel=1e-5)
    for module in setup["unet"].modules():
        assert not module._forward_pre_hooks, "Encode left a forward pre-hook behind"


def test_encode_is_the_input_of_the_memory_transformer_at_t1(setup):
    """The cached tensor equals what a direct U-Net call at sigma(t=1) feeds the memory layer."""
    import comfy.sample
    model, unet = setup["model"], setup["unet"]
    latent = setup["reference"]["samples"]
    base = model.model
    sigma = torch.tensor([setup["cache"].metadata["sigma"]])
    noise = comfy.sample.prepare_noise(latent, 0)
    x = base.process_latent_in(latent) + sigma * noise
    seen = {}
    def record(module, args):
        seen.setdefault("x", args[0].detach())
    handle = unet.middle_block[1].register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            base.apply_model(x, sigma, c_crossattn=text_conditioning(0)[0][0])
    finally:
        handle.remove()
    torch.testing.assert_close(setup["cache"].features["middle_block.1"].float(), seen["x"].half().float())


def test_lora_style_weight_patch_changes_the_cache_and_is_undone(setup):
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    model = setup["model"]
    key = "diffusion_model.input_blocks.0.0.weight"
    weight = model.model.state_dict()[key]
    lora = model.clone()
    lora.add_patches({key: (0.2 * torch.ones_like(weight),)}, 1.0)
    (with_lora,) = run_node(DreamCacheEncode, lora, setup["reference"], text_conditioning(0), seed=0)
    (again,) = run_node(DreamCacheEncode, model, setup["reference"], text_conditioning(0), seed=0)
    for k in setup["cache"].keys:
        assert not torch.equal(with_lora.features[k], setup["cache"].features[k])
        assert torch.equal(again.features[k], setup["cache"].features[k])


def test_strength_zero_fresh_adapter_and_bypass_are_bit_identical(setup):
    reference = sample(setup["model"])
    assert torch.isfinite(reference).all()
    at_zero = apply(setup, setup["trained"], strength=0.0)
    assert at_zero is setup["model"]
    assert torch.equal(sample(at_zero), reference)
    assert torch.equal(sample(apply(setup, setup["fresh"], strength=1.0)), reference)
    assert torch.equal(sample(apply(setup, setup["fresh"], apply_to="positive and negative")), reference)
    personalised = sample(apply(setup, setup["trained"]))
    assert (personalised - reference).abs().max() > 1e-3
    # bypassing Apply = the sampler takes the input MODEL: untouched by the patched clone
    assert torch.equal(sample(setup["model"]), reference)
    assert not setup["model"].model_options.get("transformer_options", {}).get("patches")


def test_end_percent_zero_window_is_identity_and_partial_window_differs(setup):
    reference = sample(setup["model"])
    window = apply(setup, setup["trained"], start=0.0, end=0.0)
    assert torch.equal(sample(window), reference)
    partial = sample(apply(setup, setup["trained"], start=0.0, end=0.5))
    full = sample(apply(setup, setup["trained"]))
    assert not torch.equal(partial, reference) and not torch.equal(partial, full)


def capture_block_outputs(model, key_module):
    """One KSampler step recording the memory transformer's outputs and the chunk order."""
    records = []

    def spy(a1, extra_options):
        if extra_options.get("block") == ("output", 4):
            records.append({"order": list(extra_options["cond_or_uncond"])})
        return a1
    watched = model.clone()
    watched.set_model_attn1_output_patch(spy)
    def record(module, args, out):
        records[-1].setdefault("out", out.detach().clone())
    handle = key_module.register_forward_hook(record)
    try:
        ksample(watched, text_conditioning(1), text_conditioning(2), torch.zeros(1, 4, LATENT, LATENT), steps=1)
    finally:
        handle.remove()
    return records[0]


def test_positive_only_leaves_the_negative_chunk_unchanged(setup):
    module = setup["unet"].output_blocks[4][1]
    plain = capture_block_outputs(setup["model"], module)
    positive_only = capture_block_outputs(apply(setup, setup["trained"]), module)
    both = capture_block_outputs(apply(setup, setup["trained"], apply_to="positive and negative"), module)
    assert sorted(plain["order"]) == [0, 1] and plain["order"] == positive_only["order"]
    neg = plain["order"].index(1)
    pos = plain["order"].index(0)
    assert torch.equal(positive_only["out"][neg], plain["out"][neg])
    assert not torch.equal(positive_only["out"][pos], plain["out"][pos])
    assert not torch.equal(both["out"][neg], plain["out"][neg])


def test_kv_reuse_is_identical_to_recomputing(setup):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import attach_injection
    from comfyui_dreamcache.dreamcache_core.method.patch import DreamCacheInjection
    outputs = []
    for reuse in (True, False):
        injection = DreamCacheInjection(setup["trained"], setup["cache"], reuse_memory_kv=reuse)
        outputs.append(sample(attach_injection(setup["model"].clone(), injection)))
    assert torch.equal(outputs[0], outputs[1])


def test_mismatched_adapter_cache_and_latent_fail_with_advice(setup):
    from comfyui_dreamcache.nodes.apply import DreamCacheApply
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    from tiny_models import TINY_SD15
    other = tiny_sd15_model(seed=1, config=dict(TINY_SD15, model_channels=64, num_heads=4))
    other_unet = other.model.diffusion_model
    other_adapter = build_adapter(discover_memory_layers(other_unet), model_signature(other_unet))
    with pytest.raises(ValueError, match="another base model"):
        apply(setup, other_adapter)
    (other_cache,) = run_node(DreamCacheEncode, other, setup["reference"], [[torch.randn(1, 4, 64), {}]], seed=0)
    with pytest.raises(ValueError, match="encoded on another model"):
        run_node(DreamCacheApply, setup["model"], setup["trained"], other_cache, 1.0, 0.0, 1.0, "positive only")
    with pytest.raises(ValueError, match="4-channel latents"):
        run_node(DreamCacheEncode, setup["model"], {"samples": torch.randn(1, 16, 8, 8)}, text_conditioning(0), 0)
    with pytest.raises(ValueError, match="start_percent"):
        apply(setup, setup["trained"], start=0.8, end=0.2)


def test_encode_with_mask_keeps_subject_tokens_only(setup):
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1
    (masked,) = run_node(DreamCacheEncode, setup["model"], setup["reference"], text_conditioning(0), 0, mask=mask)
    tokens = masked.memory_tokens("output_blocks.10.1", "cpu", torch.float32)
    assert tokens.shape == (1, 8 * 8, 32)
    assert masked.token_masks["output_blocks.10.1"].view(16, 16)[4:12, 4:12].all()
    with pytest.raises(ValueError, match="empty"):
        run_node(DreamCacheEncode, setup["model"], setup["reference"], text_conditioning(0), 0, mask=torch.zeros(1, 64, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_encode_and_sample(setup, dtype):
    from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
    from comfyui_dreamcache.nodes.apply import DreamCacheApply
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    model = tiny_sd15_model(seed=0, dtype=dtype)
    unet = model.model.diffusion_model
    assert next(unet.parameters()).dtype == dtype
    (cache,) = run_node(DreamCacheEncode, model, setup["reference"], text_conditioning(0), seed=0)
    assert all(torch.isfinite(v.float()).all() for v in cache.features.values())
    (patched,) = run_node(DreamCacheApply, model, setup["trained"], cache, 1.0, 0.0, 1.0, "positive only")
    plain, personal = sample(model), sample(patched)
    assert torch.isfinite(personal).all() and (personal - plain).abs().max() > 1e-3
    (fresh_model,) = run_node(DreamCacheApply, model, build_adapter(setup["specs"]), cache, 1.0, 0.0, 1.0, "positive only")
    assert torch.equal(sample(fresh_model), plain)


def test_comfy_attention_matches_plain_attention(setup):
    from comfyui_dreamcache.dreamcache_core.method.adapter import multihead_attention
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import comfy_memory_attention
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(3, 10, 32, generator=generator)
    k, v = torch.randn(1, 7, 32, generator=generator), torch.randn(1, 7, 32, generator=generator)
    mask = torch.tensor([[True, True, False, True, False, True, True]])
    torch.testing.assert_close(comfy_memory_attention(q, k, v, 4), multihead_attention(q, k, v, 4))
    torch.testing.assert_close(comfy_memory_attention(q, k, v, 4, mask), multihead_attention(q, k, v, 4, mask))
    torch.testing.assert_close(multihead_attention(q, k, v, 4, mask), multihead_attention(q, k[:, mask[0]], v[:, mask[0]], 4))
