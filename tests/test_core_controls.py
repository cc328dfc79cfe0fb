"""Artist controls in plain torch: guidance arithmetic, reference weights, Combine, regions, layer weights,
one reference per image. The patch callables are driven with synthetic extra_options, as ComfyUI's
transformer block calls them."""
import math

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter, multihead_attention
from comfyui_dreamcache.dreamcache_core.io.cache_files import load_cache, save_cache
from comfyui_dreamcache.dreamcache_core.method.cache import (DreamCache, check_reference_weights, combine_caches,
                                                      parse_reference_weights, token_masks_from_mask)
from comfyui_dreamcache.dreamcache_core.method.controls import (layer_strengths, parse_layer_weights, prepare_region_mask,
                                                         region_token_weights, token_grid)
from comfyui_dreamcache.dreamcache_core.method.guidance import combined_guidance, joint_guidance, needed_predictions
from comfyui_dreamcache.dreamcache_core.method.patch import DreamCacheInjection
from core_fixtures import TINY_SIGNATURE, TINY_SPECS, random_tensor

SPEC = TINY_SPECS[1]  # ("output", 4), width 48, 4 heads
GRID = (4, 4)         # the token grid the synthetic block runs at
ADAPTER = build_adapter(TINY_SPECS, TINY_SIGNATURE).randomize_(seed=1)


def make_cache(num_refs=1, seed=0, size=4, masks=None, weights=None):
    features = {s.key: random_tensor(num_refs, s.channels, size, size, seed=seed + 10 * i) for i, s in enumerate(TINY_SPECS)}
    token_masks = {} if masks is None else token_masks_from_mask(masks, {k: (num_refs, size, size) for k in features})
    return DreamCache(features, token_masks, {"signature": TINY_SIGNATURE, "latent_size": [size, size]}, weights)


def duplicate(cache, times=2):
    return DreamCache({k: v.repeat(times, 1, 1, 1) for k, v in cache.features.items()},
                      {k: v.repeat(times, 1) for k, v in cache.token_masks.items()}, dict(cache.metadata))


def run(injection, block=("output", 4), cond_or_uncond=(1, 0), images=2, sigma=5.0, seed=40, grid=GRID, n=None, a1=None):
    """attn1_patch then attn1_output_patch on one block call, as BasicTransformerBlock does."""
    batch = images * len(cond_or_uncond)
    tokens = grid[0] * grid[1]
    n = random_tensor(batch, tokens, SPEC.dim, seed=seed) if n is None else n
    a1 = random_tensor(batch, tokens, SPEC.dim, seed=seed + 1) if a1 is None else a1
    extra = {"block": block, "block_index": 0, "cond_or_uncond": list(cond_or_uncond),
             "sigmas": torch.full((batch,), sigma), "activations_shape": [batch, SPEC.channels, grid[0], grid[1]],
             "original_shape": [batch // len(cond_or_uncond), 4, grid[0] * 2, grid[1] * 2]}
    with torch.no_grad():
        injection.attn1_patch(n, n, n, extra)
        out = injection.attn1_output_patch(a1, extra)
    return a1, out, n


def injection(cache, **kwargs):
    kwargs.setdefault("chunks", None)
    return DreamCacheInjection(ADAPTER, cache, **kwargs)


# ---------------------------------------------------------------- guidance arithmetic


def test_combined_guidance_is_the_formula_and_reduces_to_joint():
    e_none, e_image, e_full = (random_tensor(2, 4, 8, 8, seed=s) for s in (1, 2, 3))
    expected = e_none + 5.0 * (e_image - e_none) + 7.5 * (e_full - e_image)
    torch.testing.assert_close(combined_guidance(e_none, e_image, e_full, 7.5, 5.0), expected)
    # s_I == s_T: the combined form is the joint one, with or without e(I,0)
    joint = joint_guidance(e_none, e_full, 6.0)
    torch.testing.assert_close(combined_guidance(e_none, e_image, e_full, 6.0, 6.0), joint, rtol=0, atol=1e-5)
    assert torch.equal(combined_guidance(e_none, None, e_full, 6.0, 6.0), joint)
    torch.testing.assert_close(joint, e_none + 6.0 * (e_full - e_none))
    # s_I == 1 needs no e(0,0)
    torch.testing.assert_close(combined_guidance(None, e_image, e_full, 7.5, 1.0),
                               combined_guidance(e_none, e_image, e_full, 7.5, 1.0), rtol=0, atol=1e-5)
    assert torch.equal(combined_guidance(None, None, e_full, 1.0, 1.0), e_full)
    with pytest.raises(ValueError, match="need"):
        combined_guidance(e_none, None, e_full, 7.5, 5.0)


def test_needed_predictions_skip_only_redundant_ones():
    assert needed_predictions(7.5, 5.0) == (True, True, True)
    assert needed_predictions(7.5, 7.5) == (True, False, True)
    assert needed_predictions(7.5, 1.0) == (True, True, False)
    assert needed_predictions(1.0, 1.0) == (True, False, False)
    assert needed_predictions(7.5, 7.5, optimise=False) == (True, True, True)


# ---------------------------------------------------------------- several references, weights, Combine


def test_one_reference_twice_with_weights_summing_to_one_equals_once():
    single = make_cache(1, seed=3)
    twice = duplicate(single)
    _, once, _ = run(injection(single))
    for weights in ([0.5, 0.5], [0.3, 0.7], [0.9, 0.1], None):
        _, out, _ = run(injection(twice, reference_weights=weights))
        torch.testing.assert_close(out, once, rtol=1e-5, atol=1e-6)
    # the same through Combine (the cache carries the weights)
    _, combined, _ = run(injection(combine_caches([single, single], [0.25, 0.75])))
    torch.testing.assert_close(combined, once, rtol=1e-5, atol=1e-6)


def test_reference_weights_are_a_log_bias_on_each_references_keys():
    cache = make_cache(2, seed=5)
    inj = injection(cache, reference_weights=[3.0, 1.0])
    a1, out, n = run(inj, cond_or_uncond=(0,), images=1)
    layer = ADAPTER.layer(SPEC.key)
    tokens = cache.memory_tokens(SPEC.key, "cpu", torch.float32)
    bias = torch.cat([torch.full((16,), math.log(0.75)), torch.full((16,), math.log(0.25))])
    with torch.no_grad():
        k, v = layer.project_memory(tokens)
        q = torch.nn.functional.linear(n * layer.mem_norm_scale + layer.mem_norm_shift, layer.to_q.weight)
        heads, dim_head = SPEC.heads, SPEC.dim_head
        qh = q.view(1, -1, heads, dim_head).transpose(1, 2)
        kh = k.view(1, -1, heads, dim_head).transpose(1, 2)
        vh = v.view(1, -1, heads, dim_head).transpose(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dim_head) + bias, dim=-1)
        m = (probs @ vh).transpose(1, 2).reshape(1, -1, heads * dim_head)
        m = layer.to_out(m)
        expected = layer.linear_cat(torch.cat([a1, m], dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    _, equal, _ = run(injection(cache), cond_or_uncond=(0,), images=1)
    assert (out - equal).abs().max() > 1e-4
    # weight 0 leaves a reference out: the same as a cache of the other one alone
    _, only_second, _ = run(injection(cache, reference_weights=[0.0, 2.0]), cond_or_uncond=(0,), images=1)
    _, second, _ = run(injection(cache.select([1])), cond_or_uncond=(0,), images=1)
    torch.testing.assert_close(only_second, second, rtol=1e-5, atol=1e-6)


def test_float_key_mask_is_an_additive_bias_in_multihead_attention():
    q, k, v = random_tensor(2, 5, 16, seed=1), random_tensor(1, 6, 16, seed=2), random_tensor(1, 6, 16, seed=3)
    bias = torch.tensor([[0.0, math.log(0.5), -1.0, 0.0, 2.0, 0.0]])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.view(2, 5, 4, 4).transpose(1, 2), k.expand(2, -1, -1).view(2, 6, 4, 4).transpose(1, 2),
        v.expand(2, -1, -1).view(2, 6, 4, 4).transpose(1, 2), attn_mask=bias[:, None, None, :].expand(2, 1, 1, 6))
    torch.testing.assert_close(multihead_attention(q, k, v, 4, bias), expected.transpose(1, 2).reshape(2, 5, 16))
    boolean = torch.tensor([[True, False, True, True, False, True]])
    torch.testing.assert_close(multihead_attention(q, k, v, 4, boolean), multihead_attention(q, k[:, boolean[0]], v[:, boolean[0]], 4))


def test_wrong_reference_weights_fail_clearly():
    cache = make_cache(2)
    with pytest.raises(ValueError, match="3 reference weights were given for a cache of 2 references"):
        injection(cache, reference_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="one weight per reference"):
        parse_reference_weights("1", 2)
    with pytest.raises(ValueError, match="one weight per reference"):
        cache.with_reference_weights([1.0])
    with pytest.raises(ValueError, match=">= 0"):
        check_reference_weights([1, -1], 2)
    with pytest.raises(ValueError, match="All reference weights are 0"):
        parse_reference_weights("0, 0", 2)
    with pytest.raises(ValueError, match="numbers separated by commas"):
        parse_reference_weights("1, heavy", 2)
    assert parse_reference_weights("  ", 2) is None
    assert parse_reference_weights("1; 0.5", 2) == [1.0, 0.5]


def test_combine_pads_other_sizes_and_keeps_union_weights_and_round_trip(tmp_path):
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    small = make_cache(1, seed=1, size=4, masks=mask)       # 2x2 subject tokens of 4x4
    large = make_cache(2, seed=2, size=6, weights=[1.0, 3.0])
    combined = combine_caches([small, large], [2.0, 1.0])
    assert combined.num_references == 3
    assert combined.reference_weights == pytest.approx([2.0, 0.25, 0.75])
    key = SPEC.key
    assert combined.features[key].shape[2:] == (6, 6)
    assert combined.token_counts(key) == [4, 36, 36]
    expected = torch.cat([small.memory_tokens(key, "cpu", torch.float32), large.memory_tokens(key, "cpu", torch.float32)], 1)
    assert torch.equal(combined.memory_tokens(key, "cpu", torch.float32), expected)
    tokens, key_mask = combined.per_reference_tokens(key, "cpu", torch.float32)
    assert tokens.shape == (3, 36, SPEC.channels) and key_mask.sum(1).tolist() == [4, 36, 36]
    assert torch.equal(tokens[0, :4], small.memory_tokens(key, "cpu", torch.float32)[0])
    path = str(tmp_path / "combined.safetensors")
    save_cache(combined, path)
    loaded = load_cache(path)
    assert loaded.reference_weights == combined.reference_weights
    assert torch.equal(loaded.token_masks[key], combined.token_masks[key])
    other = DreamCache({k: v[:, :8] for k, v in small.features.items()}, {}, {})
    with pytest.raises(ValueError, match="different models"):
        combine_caches([small, other])


# ---------------------------------------------------------------- regions


def half_mask(left=True, size=(32, 32)):
    mask = torch.zeros(1, *size)
    if left:
        mask[:, :, : size[1] // 2] = 1
    else:
        mask[:, :, size[1] // 2:] = 1
    return mask


def test_region_mask_outside_is_bit_identical_inside_is_the_unmasked_output():
    cache = make_cache(1, seed=3)
    a1, full, _ = run(injection(cache))
    _, masked, _ = run(injection(cache, region_mask=half_mask(left=True)))
    grid = torch.zeros(GRID, dtype=torch.bool)
    grid[:, :2] = True
    inside = grid.flatten()
    assert torch.equal(masked[:, ~inside], a1[:, ~inside])
    torch.testing.assert_close(masked[:, inside], full[:, inside], rtol=1e-5, atol=1e-6)
    assert (masked[:, inside] - a1[:, inside]).abs().max() > 1e-3


def test_region_mask_of_another_size_is_resized_and_soft_edges_blend():
    cache = make_cache(1, seed=3)
    a1, full, _ = run(injection(cache))
    # 12x8 mask over a 4x4 grid: each token spans 3x2 mask pixels; 3 columns cover 1.5 columns of tokens
    mask = torch.zeros(1, 12, 8)
    mask[:, :, :3] = 1
    _, out, _ = run(injection(cache, region_mask=mask))
    weights = region_token_weights(prepare_region_mask(mask), 4, 4).view(4, 4)
    assert weights[:, 0].eq(1).all() and weights[:, 1].eq(0.5).all() and weights[:, 2:].eq(0).all()
    tokens = torch.arange(16).view(4, 4)
    torch.testing.assert_close(out[:, tokens[:, 0].flatten()], full[:, tokens[:, 0].flatten()], rtol=1e-5, atol=1e-6)
    half = tokens[:, 1].flatten()
    torch.testing.assert_close(out[:, half], a1[:, half] + 0.5 * (full[:, half] - a1[:, half]), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, tokens[:, 2:].flatten()], a1[:, tokens[:, 2:].flatten()])


def test_two_caches_with_disjoint_regions_change_only_their_own_region():
    first, second = make_cache(1, seed=3), make_cache(1, seed=8)
    left, right = injection(first, region_mask=half_mask(True)), injection(second, region_mask=half_mask(False))
    batch, tokens = 4, 16
    n, a1 = random_tensor(batch, tokens, SPEC.dim, seed=40), random_tensor(batch, tokens, SPEC.dim, seed=41)
    extra = {"block": ("output", 4), "block_index": 0, "cond_or_uncond": [1, 0], "sigmas": torch.full((batch,), 5.0),
             "activations_shape": [batch, SPEC.channels, 4, 4]}
    with torch.no_grad():
        for inj in (left, right):
            inj.attn1_patch(n, n, n, extra)
        out = right.attn1_output_patch(left.attn1_output_patch(a1, extra), extra)
    _, only_first, _ = run(injection(first), n=n, a1=a1)
    _, only_second, _ = run(injection(second), n=n, a1=a1)
    columns = torch.arange(16).view(4, 4)
    left_tokens, right_tokens = columns[:, :2].flatten(), columns[:, 2:].flatten()
    torch.testing.assert_close(out[:, left_tokens], only_first[:, left_tokens], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, right_tokens], only_second[:, right_tokens], rtol=1e-5, atol=1e-6)


def test_region_mask_errors_and_batches():
    cache = make_cache(1)
    with pytest.raises(ValueError, match="empty"):
        injection(cache, region_mask=torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="mask 1 is empty"):
        injection(cache, region_mask=torch.stack([torch.ones(8, 8), torch.zeros(8, 8)]))
    per_image = torch.stack([half_mask(True)[0], half_mask(False)[0]])
    a1, out, _ = run(injection(cache, region_mask=per_image), images=2)
    columns = torch.arange(16).view(4, 4)
    # rows: [neg img0, neg img1, pos img0, pos img1]; image 0 -> left half, image 1 -> right half
    for row, untouched in ((0, columns[:, 2:]), (2, columns[:, 2:]), (1, columns[:, :2]), (3, columns[:, :2])):
        assert torch.equal(out[row, untouched.flatten()], a1[row, untouched.flatten()])
    with pytest.raises(ValueError, match="3 masks for a batch of 2 images"):
        run(injection(cache, region_mask=torch.ones(3, 8, 8)), images=2)


def test_token_grid_from_activations_or_original_shape():
    assert token_grid({"activations_shape": [2, 32, 3, 5]}, 15) == (3, 5)
    assert token_grid({"original_shape": [2, 4, 24, 40]}, 15) == (3, 5)
    assert token_grid({}, 16) == (4, 4)
    with pytest.raises(ValueError, match="token grid"):
        token_grid({}, 15)


# ---------------------------------------------------------------- per-layer weights


def test_layer_weight_parsing():
    assert layer_strengths(TINY_SPECS, 0.5, 2.0) == {"middle_block.1": 0.5, "output_blocks.4.1": 2.0,
                                                     "output_blocks.6.1": 2.0}
    assert parse_layer_weights("output.6=0.3; middle_block.1=0", TINY_SPECS) == {"output_blocks.6.1": 0.3,
                                                                               "middle_block.1": 0.0}
    assert layer_strengths(TINY_SPECS, 1.0, 1.0, "decoder=0.1, output_blocks.4.1=0.7")["output_blocks.4.1"] == 0.7
    assert parse_layer_weights("", TINY_SPECS) == {}
    with pytest.raises(ValueError, match="not a memory layer"):
        parse_layer_weights("input.4=1", TINY_SPECS)
    with pytest.raises(ValueError, match="no '='"):
        parse_layer_weights("middle 0.5", TINY_SPECS)
    with pytest.raises(ValueError, match="not a number"):
        parse_layer_weights("middle=lots", TINY_SPECS)
    with pytest.raises(ValueError, match="not memory layers"):
        injection(make_cache(), layer_strengths={"output_blocks.9.1": 1.0})


def test_each_layer_weight_reaches_only_that_layer():
    cache = make_cache(1, seed=3)
    blocks = {s.key: s.block for s in TINY_SPECS}

    def outputs(inj):
        result = {}
        for key, block in blocks.items():
            spec = next(s for s in TINY_SPECS if s.key == key)
            n = random_tensor(2, 16, spec.dim, seed=60)
            a1 = random_tensor(2, 16, spec.dim, seed=61)
            extra = {"block": block, "block_index": 0, "cond_or_uncond": [0, 1], "sigmas": torch.full((2,), 5.0)}
            with torch.no_grad():
                inj.attn1_patch(n, n, n, extra)
                result[key] = (a1, inj.attn1_output_patch(a1, extra))
        return result

    full = outputs(injection(cache))
    for key in blocks:
        weighted = outputs(injection(cache, layer_strengths={key: 0.5}))
        zeroed = outputs(injection(cache, layer_strengths={key: 0.0}))
        for other in blocks:
            a1, out_full = full[other]
            if other == key:
                torch.testing.assert_close(weighted[other][1], a1 + 0.5 * (out_full - a1))
                assert zeroed[other][1] is zeroed[other][0]
            else:
                assert torch.equal(weighted[other][1], out_full) and torch.equal(zeroed[other][1], out_full)


# ---------------------------------------------------------------- one reference per image


def test_one_reference_per_image_uses_reference_i_for_image_i_with_padded_keys():
    masks = torch.zeros(3, 16, 16)
    masks[0, 4:12, 4:12] = 1    # 4 subject tokens
    masks[1] = 1                # all 16
    masks[2, 0:8, 0:16] = 1     # 8
    cache = make_cache(3, seed=11, masks=masks)
    assert cache.token_counts(SPEC.key) == [4, 16, 8]
    a1, out, n = run(injection(cache, reference_mode="per_image", chunks=(0,)), cond_or_uncond=(1, 0), images=3)
    assert torch.equal(out[:3], a1[:3])  # negative chunk excluded
    for image in range(3):
        row = 3 + image
        _, single, _ = run(injection(cache.select([image]), chunks=(0,)), cond_or_uncond=(0,), images=1,
                           n=n[row:row + 1], a1=a1[row:row + 1])
        torch.testing.assert_close(out[row:row + 1], single, rtol=1e-5, atol=1e-6)
    _, shared, _ = run(injection(cache, chunks=(0,)), cond_or_uncond=(1, 0), images=3)
    assert (shared[3:] - out[3:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="holds 3 references but the batch has 2 images"):
        run(injection(cache, reference_mode="per_image"), images=2)
    with pytest.raises(ValueError, match="reference_mode"):
        injection(cache, reference_mode="each")


def test_one_reference_per_image_combines_with_regions():
    cache = make_cache(2, seed=11)
    a1, out, n = run(injection(cache, reference_mode="per_image", region_mask=half_mask(True)), images=2)
    columns = torch.arange(16).view(4, 4)
    assert torch.equal(out[:, columns[:, 2:].flatten()], a1[:, columns[:, 2:].flatten()])
    _, unmasked, _ = run(injection(cache, reference_mode="per_image"), images=2)
    left = columns[:, :2].flatten()
    torch.testing.assert_close(out[:, left], unmasked[:, left], rtol=1e-5, atol=1e-6)


def test_controlled_path_keeps_gradients_for_training():
    cache = make_cache(2, seed=11)
    inj = DreamCacheInjection(ADAPTER, cache, chunks=None, region_mask=half_mask(True), reference_mode="per_image")
    n, a1 = random_tensor(2, 16, SPEC.dim, seed=1), random_tensor(2, 16, SPEC.dim, seed=2)
    extra = {"block": ("output", 4), "block_index": 0, "cond_or_uncond": [0], "sigmas": torch.full((2,), 1.0),
             "activations_shape": [2, SPEC.channels, 4, 4]}
    inj.attn1_patch(n, n, n, extra)
    out = inj.attn1_output_patch(a1, extra)
    out.square().mean().backward()
    layer = ADAPTER.layer(SPEC.key)
    assert layer.to_k.weight.grad is not None and layer.to_k.weight.grad.abs().sum() > 0
    ADAPTER.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- example workflows


def test_issue_4_example_workflows_show_the_controls():
    import json
    from pathlib import Path
    folder = Path(__file__).resolve().parent.parent / "example_workflows"

    def load(name):
        workflow = json.loads((folder / name).read_text(encoding="utf-8"))
        nodes = {node["id"]: node for node in workflow["nodes"]}
        links = {link[0]: link for link in workflow["links"]}
        return nodes, links

    def linked_inputs(node):
        return {entry["name"] for entry in node.get("inputs") or [] if entry.get("link") is not None}

    nodes, links = load("dreamcache_guider.json")
    guiders = [n for n in nodes.values() if n["type"] == "DreamCacheGuider"]
    assert len(guiders) == 1 and guiders[0]["widgets_values"][:2] == [7.5, 5.0]
    assert {"model", "adapter", "cache", "positive", "negative"} <= linked_inputs(guiders[0])
    sampler = next(n for n in nodes.values() if n["type"] == "SamplerCustomAdvanced")
    guider_link = next(e["link"] for e in sampler["inputs"] if e["name"] == "guider")
    assert links[guider_link][1] == guiders[0]["id"]

    nodes, links = load("dreamcache_two_subjects_regions.json")
    applies = [n for n in nodes.values() if n["type"] == "DreamCacheApply"]
    assert len(applies) == 2 and all("attn_mask" in linked_inputs(n) for n in applies)
    caches = {links[next(e["link"] for e in n["inputs"] if e["name"] == "cache")][1] for n in applies}
    masks = {links[next(e["link"] for e in n["inputs"] if e["name"] == "attn_mask")][1] for n in applies}
    assert len(caches) == 2 and len(masks) == 2, "two caches and two different masks"
    first_model = links[next(e["link"] for e in applies[1]["inputs"] if e["name"] == "model")][1]
    assert first_model == applies[0]["id"], "the Apply nodes are chained"

    nodes, _ = load("dreamcache_sdxl.json")
    checkpoint = next(n for n in nodes.values() if n["type"] == "CheckpointLoaderSimple")
    assert "xl" in checkpoint["widgets_values"][0].lower()
    assert any(n["type"] == "DreamCacheApply" for n in nodes.values())
    assert next(n for n in nodes.values() if n["type"] == "EmptyLatentImage")["widgets_values"][:2] == [1024, 1024]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_controls_run_in_half_precision(dtype):
    cache = make_cache(2, seed=11)
    n = random_tensor(4, 16, SPEC.dim, seed=40).to(dtype)
    a1 = random_tensor(4, 16, SPEC.dim, seed=41).to(dtype)
    columns = torch.arange(16).view(4, 4)
    for kwargs in ({"reference_weights": [2.0, 1.0]}, {"reference_mode": "per_image", "region_mask": half_mask(True)},
                   {"region_mask": half_mask(False), "reference_weights": [1.0, 3.0]}):
        base, out, _ = run(injection(cache, **kwargs), n=n, a1=a1)
        assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base)
        if "region_mask" in kwargs:
            untouched = columns[:, 2:] if kwargs.get("reference_mode") else columns[:, :2]
            assert torch.equal(out[:, untouched.flatten()], base[:, untouched.flatten()])
