"""Artist controls through ComfyUI's real sampling code on tiny SD1.5- and SDXL-shaped U-Nets: the combined
guider (SamplerCustomAdvanced), Combine and reference weights, regions, per-layer weights, batches, SDXL.

Skipped (with the reason) when COMFYUI_PATH is unset.
"""
import pytest
import torch

from tiny_models import sdxl_text_conditioning, text_conditioning, tiny_setup, tiny_setup_with_caches
from run_as_comfyui import in_prompt, run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

LATENT = 8     # 8x8 latents (64 px) unless a test needs finer token grids
STEPS = 2


@pytest.fixture(scope="module")
def sd15():
    return tiny_setup_with_caches(2)


class FixedNoise:
    """A NOISE for SamplerCustomAdvanced that hands out a given tensor."""

    def __init__(self, noise):
        self.noise, self.seed = noise, 0

    def generate_noise(self, latent):
        return self.noise.clone()


def noise_for(batch=1, size=LATENT, seed=11):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def run_guider(guider, noise, steps=STEPS):
    """SamplerCustomAdvanced, as the node runs it."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", steps)
    out, _ = run_node(SamplerCustomAdvanced, FixedNoise(noise), guider, comfy.samplers.sampler_object("euler"), sigmas,
                      {"samples": torch.zeros_like(noise)})
    return out["samples"]


def cfg_sample(model, positive, negative, noise, cfg=5.0, steps=STEPS):
    """The stock CFG guider (what KSampler uses) with explicit noise."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return run_guider(guider, noise, steps)


def apply(model, adapter, cache, strength=1.0, apply_to="positive only", **optional):
    from comfyui_dreamcache.nodes.apply import DreamCacheApply
    (patched,) = run_node(DreamCacheApply, model, adapter, cache, strength, 0.0, 1.0, apply_to, **optional)
    return patched


def guider_node(model, adapter, cache, positive, negative, text_cfg, image_cfg, **optional):
    from comfyui_dreamcache.nodes.guider import DreamCacheGuider
    (guider,) = run_node(DreamCacheGuider, model, adapter, cache, positive, negative, text_cfg, image_cfg, **optional)
    return guider


def prediction_at(guider, noise):
    """The guider's denoised prediction at the first sigma of the schedule (one model evaluation)."""
    import comfy.samplers

    seen = {}

    class Probe(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            with torch.no_grad():
                seen["x0"] = model_wrap(noise * sigmas[0], sigmas[0].expand(noise.shape[0]), **extra_args)
            return latent_image

    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", 4)
    with in_prompt():
        guider.sample(noise, torch.zeros_like(noise), Probe(), sigmas, disable_pbar=True, seed=0)
    return seen["x0"]


def assert_close(actual, expected, rel=2e-5):
    """Equal up to float32 rounding of differently batched U-Net calls, relative to the tensors' scale (the
    random tiny models predict values of tens to hundreds, and guidance scales amplify rounding)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def plain_guider(model, positive, negative, cfg=1.0):
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def watch_self_attention(model, spy):
    """A clone that calls ``spy(x, extra_options)`` on every transformer block's hidden state right after the
    self-attention's residual add, that is after every attn1 output patch (ComfyUI's "middle_patch" hook). The
    pack nests its own output patch outside the others, so a spy registered as one more attn1 output patch
    would see the attention output before the pack's."""
    def hook(x, extra_options):
        spy(x, extra_options)
        return x
    watched = model.clone()
    watched.set_model_patch(hook, "middle_patch")
    return watched


def spy_block(model, block, block_index=0):
    """A clone recording ``block``'s hidden state after its (patched) self-attention, per U-Net call."""
    records = []

    def spy(x, extra_options):
        if extra_options.get("block") == block and extra_options.get("block_index") == block_index:
            records.append({"out": x.detach().clone(), "order": list(extra_options["cond_or_uncond"])})
    return watch_self_attention(model, spy), records


# ---------------------------------------------------------------- combined guidance


def test_guider_node_is_registered_for_sampler_custom_advanced(sd15):
    from comfyui_dreamcache import nodes as pack_nodes
    from node_contract import in_pack_category
    for node_id, display in (("DreamCacheGuider", "DreamCache Guider"), ("DreamCacheCombine", "Combine DreamCache")):
        node_class = pack_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        assert in_pack_category(node_class.CATEGORY) and node_class.DESCRIPTION
        for section in ("required", "optional"):
            for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    inputs = pack_nodes.NODE_CLASS_MAPPINGS["DreamCacheGuider"].INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "adapter", "cache", "positive", "negative", "text_cfg", "image_cfg"]
    assert inputs["text_cfg"][1]["default"] == 7.5 and inputs["image_cfg"][1]["default"] == 5.0
    assert tuple(pack_nodes.NODE_CLASS_MAPPINGS["DreamCacheGuider"].RETURN_TYPES) == ("GUIDER",)
    optional = pack_nodes.NODE_CLASS_MAPPINGS["DreamCacheApply"].INPUT_TYPES()["optional"]
    assert optional["attn_mask"][0] == "MASK" and "resized" in optional["attn_mask"][1]["tooltip"]
    assert "one reference per image" in optional["reference_mode"][1]["options"]


def test_combined_guidance_equals_three_separate_predictions(sd15):
    """e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0)) from ONE batched call == from three separate calls."""
    model, cache, trained = sd15["model"], sd15["caches"][0], sd15["trained"]
    positive, negative = sd15["positive"], sd15["negative"]
    noise = noise_for()
    watched, records = spy_block(model, ("output", 4))
    combined = prediction_at(guider_node(watched, trained, cache, positive, negative, 7.5, 5.0), noise)
    assert len(records) == 1 and sorted(records[0]["order"]) == [0, 1, 2], "the three predictions ran as one batch"
    personalised = apply(model, trained, cache)
    e_image_text = prediction_at(plain_guider(personalised, positive, negative), noise)
    e_image = prediction_at(plain_guider(personalised, negative, negative), noise)
    e_none = prediction_at(plain_guider(model, negative, negative), noise)
    expected = e_none + 5.0 * (e_image - e_none) + 7.5 * (e_image_text - e_image)
    assert_close(combined, expected)
    assert (e_image - e_none).abs().max() > 1e-3, "the reference must change e(I,0)"
    # the guider left the input MODEL unpatched
    assert not model.model_options.get("transformer_options", {}).get("patches")


def test_equal_scales_reduce_to_joint_guidance(sd15):
    model, cache, trained = sd15["model"], sd15["caches"][0], sd15["trained"]
    positive, negative = sd15["positive"], sd15["negative"]
    noise = noise_for()
    joint = cfg_sample(apply(model, trained, cache), positive, negative, noise, cfg=6.0)
    # all three predictions, combined with s_I = s_T: equal up to rounding
    every = model.clone()
    every.model_options["disable_cfg1_optimization"] = True
    three = run_guider(guider_node(every, trained, cache, positive, negative, 6.0, 6.0), noise)
    assert_close(three, joint)
    # the guider skips the redundant e(I,0): then it IS the stock joint computation
    assert torch.equal(run_guider(guider_node(model, trained, cache, positive, negative, 6.0, 6.0), noise), joint)
    # a fresh adapter: every prediction is the base model's, combined guidance = plain CFG at text_cfg
    plain = cfg_sample(model, positive, negative, noise, cfg=7.5)
    fresh = run_guider(guider_node(every, sd15["fresh"], cache, positive, negative, 7.5, 5.0), noise)
    assert_close(fresh, plain)


# ---------------------------------------------------------------- several references


def test_one_image_combined_twice_equals_once_and_weight_errors(sd15):
    from comfyui_dreamcache.nodes.combine import DreamCacheCombine
    model, cache, trained = sd15["model"], sd15["caches"][0], sd15["trained"]
    positive, negative = sd15["positive"], sd15["negative"]
    noise = noise_for()
    once = cfg_sample(apply(model, trained, cache), positive, negative, noise)
    twice, no_negative = run_node(DreamCacheCombine, cache, cache, 0.3, 0.7)
    assert no_negative is None  # "union" makes no negative reference
    assert twice.num_references == 2
    assert_close(cfg_sample(apply(model, trained, twice), positive, negative, noise), once)
    reweighted = apply(model, trained, twice, reference_weights="0.9, 0.1")
    assert_close(cfg_sample(reweighted, positive, negative, noise), once)
    both, _ = run_node(DreamCacheCombine, cache, sd15["caches"][1], 1.0, 1.0)
    leaning = cfg_sample(apply(model, trained, both, reference_weights="1, 0"), positive, negative, noise)
    assert_close(leaning, once)
    mixed = cfg_sample(apply(model, trained, both), positive, negative, noise)
    assert (mixed - once).abs().max() > 1e-3
    with pytest.raises(ValueError, match="3 reference weights were given for a cache of 2 references"):
        apply(model, trained, both, reference_weights="1, 2, 3")


# ---------------------------------------------------------------- regions


def test_two_caches_two_regions_each_region_changed_only_by_its_cache(sd15):
    model, trained = sd15["model"], sd15["trained"]
    first, second = sd15["caches"]
    size = 16  # 16x16 latent: the middle memory layer has 2x2 tokens
    left, right = torch.zeros(1, 128, 128), torch.zeros(1, 128, 128)
    left[:, :, :64], right[:, :, 64:] = 1, 1
    both = apply(apply(model, trained, first, attn_mask=left), trained, second, attn_mask=right)
    noise = noise_for(size=size)

    def middle_output(candidate):
        watched, records = spy_block(candidate, ("middle", 0))
        prediction_at(plain_guider(watched, sd15["positive"], sd15["negative"], cfg=5.0), noise)
        record = records[0]
        return record["out"][record["order"].index(0)].view(2, 2, -1)  # positive chunk, [h, w, dim]

    plain, regions = middle_output(model), middle_output(both)
    only_first, only_second = middle_output(apply(model, trained, first)), middle_output(apply(model, trained, second))
    torch.testing.assert_close(regions[:, 0], only_first[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(regions[:, 1], only_second[:, 1], rtol=1e-5, atol=1e-5)
    assert (only_first[:, 1] - plain[:, 1]).abs().max() > 1e-3 and (only_second[:, 0] - plain[:, 0]).abs().max() > 1e-3
    # outside a region the block output is the unpatched one, bit for bit
    left_only = middle_output(apply(model, trained, first, attn_mask=left))
    assert torch.equal(left_only[:, 1], plain[:, 1])


def test_region_masks_are_resized_and_an_empty_one_is_an_error(sd15):
    model, cache, trained = sd15["model"], sd15["caches"][0], sd15["trained"]
    odd = torch.zeros(1, 37, 53)
    odd[:, :, :20] = 1
    noise = noise_for()
    plain = cfg_sample(model, sd15["positive"], sd15["negative"], noise)
    resized = cfg_sample(apply(model, trained, cache, attn_mask=odd), sd15["positive"], sd15["negative"], noise)
    assert torch.isfinite(resized).all() and (resized - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="empty"):
        apply(model, trained, cache, attn_mask=torch.zeros(1, 64, 64))


# ---------------------------------------------------------------- per-layer weights


def test_layer_weights_reach_their_layer(sd15):
    model, cache, trained = sd15["model"], sd15["caches"][0], sd15["trained"]
    noise = noise_for()
    middle, decoder = ("middle", 0), ("output", 4)

    def probe(candidate):
        """(denoised prediction, {block: hidden state after the patched self-attention}) of one evaluation."""
        records = {}

        def spy(x, extra_options):
            block = extra_options.get("block")
            if block in (middle, decoder) and extra_options.get("block_index") == 0:
                records[block] = x.detach().clone()
        watched = watch_self_attention(candidate, spy)
        x0 = prediction_at(plain_guider(watched, sd15["positive"], sd15["negative"], cfg=5.0), noise)
        return x0, records

    # the middle layer is the first memory layer in forward order: its input is the same in every run
    plain_x0, plain = probe(model)
    _, full = probe(apply(model, trained, cache))
    _, half = probe(apply(model, trained, cache, middle_weight=0.5))
    torch.testing.assert_close(half[middle], plain[middle] + 0.5 * (full[middle] - plain[middle]), rtol=1e-5, atol=1e-5)
    _, by_key = probe(apply(model, trained, cache, layer_weights="middle_block.1=0.5"))
    assert torch.equal(by_key[middle], half[middle])
    _, off = probe(apply(model, trained, cache, middle_weight=0.0))
    assert torch.equal(off[middle], plain[middle]) and not torch.equal(off[decoder], plain[decoder])
    # every layer at weight 0 is the unpatched model
    nothing_x0, _ = probe(apply(model, trained, cache, middle_weight=0.0, decoder_weight=0.0))
    assert torch.equal(nothing_x0, plain_x0)
    with pytest.raises(ValueError, match="not a memory layer"):
        apply(model, trained, cache, layer_weights="input_blocks.1.1=0")


# ---------------------------------------------------------------- batches


def test_one_cache_on_a_batch_of_four_gives_four_personalised_images(sd15):
    model, cache, trained = sd15["model"], sd15["caches"][0], sd15["trained"]
    positive, negative = sd15["positive"], sd15["negative"]
    personalised = apply(model, trained, cache)
    noise = noise_for(batch=4)
    batch = cfg_sample(personalised, positive, negative, noise)
    plain = cfg_sample(model, positive, negative, noise)
    for i in range(4):
        single = cfg_sample(personalised, positive, negative, noise[i:i + 1])
        assert_close(batch[i:i + 1], single)
        assert (batch[i] - plain[i]).abs().max() > 1e-3


def test_one_reference_per_image_gives_image_i_from_reference_i(sd15):
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    model, trained = sd15["model"], sd15["trained"]
    positive, negative = sd15["positive"], sd15["negative"]
    references = {"samples": torch.randn(4, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(9))}
    masks = torch.zeros(4, 64, 64)
    for i, side in enumerate((64, 48, 32, 56)):  # subjects of different sizes: different token counts
        masks[i, :side, :side] = 1
    (cache,) = run_node(DreamCacheEncode, model, references, text_conditioning(0), seed=1, mask=masks)
    counts = cache.token_counts("output_blocks.10.1")
    assert len(set(counts)) == 4, counts
    noise = noise_for(batch=4)
    per_image = cfg_sample(apply(model, trained, cache, reference_mode="one reference per image"), positive, negative, noise)
    shared = cfg_sample(apply(model, trained, cache), positive, negative, noise)
    for i in range(4):
        single = cfg_sample(apply(model, trained, cache.select([i])), positive, negative, noise[i:i + 1])
        assert_close(per_image[i:i + 1], single)
    assert (per_image - shared).abs().max() > 1e-3
    with pytest.raises(ValueError, match="holds 4 references but the batch has 2 images"):
        cfg_sample(apply(model, trained, cache, reference_mode="one reference per image"), positive, negative,
                   noise[:2], steps=1)


# ---------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl():
    setup = tiny_setup("sdxl")
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode
    reference = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))}
    (cache,) = run_node(DreamCacheEncode, setup["model"], reference, sdxl_text_conditioning(0), seed=0)
    return dict(setup, cache=cache, positive=sdxl_text_conditioning(1), negative=sdxl_text_conditioning(2))


def test_sdxl_layer_rule_cache_and_identity(sdxl):
    from comfyui_dreamcache.dreamcache_core.method.layers import iter_spatial_transformers
    unet, specs, cache = sdxl["unet"], sdxl["specs"], sdxl["cache"]
    sites = list(iter_spatial_transformers(unet))
    assert all(site.block != ("input", 1) and site.block != ("input", 2) for site in sites), "attention at full res"
    assert all(len(site.module.transformer_blocks) == 2 for site in sites)
    assert [s.key for s in specs] == ["middle_block.1", "output_blocks.1.1", "output_blocks.3.1", "output_blocks.5.1"]
    assert [(s.dim, s.heads, s.dim_head) for s in specs] == [(128, 2, 64), (128, 2, 64), (64, 1, 64), (64, 1, 64)]
    assert {k: tuple(v.shape) for k, v in cache.features.items()} == {
        "middle_block.1": (1, 128, 4, 4), "output_blocks.1.1": (1, 128, 4, 4),
        "output_blocks.3.1": (1, 64, 8, 8), "output_blocks.5.1": (1, 64, 8, 8)}
    noise = noise_for(size=16)
    model, positive, negative = sdxl["model"], sdxl["positive"], sdxl["negative"]
    plain = cfg_sample(model, positive, negative, noise)
    assert torch.equal(cfg_sample(apply(model, sdxl["fresh"], cache), positive, negative, noise), plain)
    personalised = cfg_sample(apply(model, sdxl["trained"], cache), positive, negative, noise)
    assert torch.isfinite(personalised).all() and (personalised - plain).abs().max() > 1e-3


def test_sdxl_guider_and_regions(sdxl):
    model, cache, trained = sdxl["model"], sdxl["cache"], sdxl["trained"]
    positive, negative = sdxl["positive"], sdxl["negative"]
    noise = noise_for(size=16)
    combined = prediction_at(guider_node(model, trained, cache, positive, negative, 7.5, 5.0), noise)
    personalised = apply(model, trained, cache)
    e_image_text = prediction_at(plain_guider(personalised, positive, negative), noise)
    e_image = prediction_at(plain_guider(personalised, negative, negative), noise)
    e_none = prediction_at(plain_guider(model, negative, negative), noise)
    assert_close(combined, e_none + 5.0 * (e_image - e_none) + 7.5 * (e_image_text - e_image))
    # a region over the top half: at the middle layer (4x4 tokens) the bottom rows stay bit for bit
    top = torch.zeros(1, 128, 128)
    top[:, :64] = 1

    def middle_output(candidate, guider=False):
        watched, records = spy_block(candidate, ("middle", 0))
        if guider:
            prediction_at(guider_node(watched, trained, cache, positive, negative, 7.5, 5.0, attn_mask=top), noise)
        else:
            prediction_at(plain_guider(watched, positive, negative, cfg=5.0), noise)
        return records[0]

    plain = middle_output(model)
    region = middle_output(apply(model, trained, cache, attn_mask=top))
    full = middle_output(personalised)
    pos = plain["order"].index(0)
    plain_grid = plain["out"][pos].view(4, 4, -1)
    region_grid = region["out"][region["order"].index(0)].view(4, 4, -1)
    full_grid = full["out"][full["order"].index(0)].view(4, 4, -1)
    assert torch.equal(region_grid[2:], plain_grid[2:])
    torch.testing.assert_close(region_grid[:2], full_grid[:2], rtol=1e-5, atol=1e-5)
    assert (region_grid[:2] - plain_grid[:2]).abs().max() > 1e-3
    guided = middle_output(model, guider=True)
    unconditional = guided["out"][guided["order"].index(2)].view(4, 4, -1)
    torch.testing.assert_close(unconditional, plain["out"][plain["order"].index(1)].view(4, 4, -1), rtol=0, atol=0)
    image_text = guided["out"][guided["order"].index(0)].view(4, 4, -1)
    assert torch.equal(image_text[2:], plain_grid[2:])
