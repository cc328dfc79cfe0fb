"""The patch callables driven with synthetic extra_options, as ComfyUI's transformer block calls them."""
import math

import torch

from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
from comfyui_dreamcache.dreamcache_core.method.cache import DreamCache
from comfyui_dreamcache.dreamcache_core.method.patch import DreamCacheInjection
from core_fixtures import TINY_SIGNATURE, TINY_SPECS, random_tensor

SPEC = TINY_SPECS[1]  # ("output", 4)


def make_injection(strength=1.0, seed=1, **kwargs):
    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE).randomize_(seed=seed)
    features = {s.key: random_tensor(1, s.channels, 4, 4, seed=i) for i, s in enumerate(TINY_SPECS)}
    cache = DreamCache(features, {}, {"signature": TINY_SIGNATURE})
    return DreamCacheInjection(adapter, cache, strength, **kwargs)


def run_block(injection, block=("output", 4), block_index=0, cond_or_uncond=(1, 0), sigma=5.0, batch_per_chunk=2):
    """What BasicTransformerBlock does: attn1_patch on n, then attn1_output_patch on a1, same dict."""
    batch = batch_per_chunk * len(cond_or_uncond)
    n = random_tensor(batch, 16, SPEC.dim, seed=40)
    a1 = random_tensor(batch, 16, SPEC.dim, seed=41)
    extra = {"block": block, "block_index": block_index, "cond_or_uncond": list(cond_or_uncond),
             "sigmas": torch.full((batch,), sigma), "n_heads": SPEC.heads, "dim_head": SPEC.dim_head}
    n_out, context, value = injection.attn1_patch(n, n, n, extra)
    assert n_out is n and context is n and value is n
    return a1, injection.attn1_output_patch(a1, extra), n


def direct_adapter(injection, n, a1, key=SPEC.key):
    layer = injection.adapter.layer(key)
    with torch.no_grad():
        k, v = layer.project_memory(injection.cache.memory_tokens(key, "cpu", torch.float32))
        return layer(n, a1, k, v)


def test_untouched_layers_and_deeper_blocks_return_a1_itself():
    injection = make_injection()
    for block, index in [(("input", 4), 0), (("output", 5), 0), (("output", 4), 1), (("middle", 1), 0)]:
        a1, out, _ = run_block(injection, block=block, block_index=index)
        assert out is a1


def test_positive_only_changes_only_the_positive_chunk():
    injection = make_injection()
    with torch.no_grad():
        a1, out, n = run_block(injection, cond_or_uncond=(1, 0))
    # rows 0,1 = negative (1), rows 2,3 = positive (0)
    assert torch.equal(out[:2], a1[:2])
    expected = direct_adapter(injection, n[2:], a1[2:])
    torch.testing.assert_close(out[2:], expected)
    assert (out[2:] - a1[2:]).abs().max() > 1e-3


def test_excluded_chunk_work_is_skipped_not_discarded(monkeypatch):
    injection = make_injection()
    layer = injection.adapter.layer(SPEC.key)
    seen = []
    original = type(layer).forward

    def spy(self, n, a1, *args, **kwargs):
        seen.append(a1.shape[0])
        return original(self, n, a1, *args, **kwargs)
    monkeypatch.setattr(type(layer), "forward", spy)
    with torch.no_grad():
        run_block(injection, cond_or_uncond=(1, 0), batch_per_chunk=3)
    assert seen == [3]


def test_positive_and_negative_changes_both_chunks():
    injection = make_injection(chunks=None)
    with torch.no_grad():
        a1, out, n = run_block(injection)
    torch.testing.assert_close(out, direct_adapter(injection, n, a1))


def test_strength_interpolates_and_zero_is_identity():
    full = make_injection(strength=1.0)
    half = make_injection(strength=0.5)
    zero = make_injection(strength=0.0)
    with torch.no_grad():
        a1, out_full, _ = run_block(full, cond_or_uncond=(0,))
        _, out_half, _ = run_block(half, cond_or_uncond=(0,))
        a1_zero, out_zero, _ = run_block(zero, cond_or_uncond=(0,))
    assert out_zero is a1_zero
    torch.testing.assert_close(out_half, a1 + 0.5 * (out_full - a1))


def test_outside_start_end_the_block_is_untouched():
    injection = make_injection(sigma_start=10.0, sigma_end=2.0)
    with torch.no_grad():
        a1_early, early, _ = run_block(injection, sigma=14.6)
        a1_late, late, _ = run_block(injection, sigma=0.5)
        a1, inside, _ = run_block(injection, sigma=5.0)
    assert early is a1_early and late is a1_late
    assert (inside - a1).abs().max() > 1e-3


def test_cache_broadcasts_over_batch_rows():
    injection = make_injection(chunks=None)
    n = random_tensor(1, 16, SPEC.dim, seed=40).expand(3, -1, -1).contiguous()
    a1 = random_tensor(1, 16, SPEC.dim, seed=41).expand(3, -1, -1).contiguous()
    extra = {"block": ("output", 4), "block_index": 0, "cond_or_uncond": [0], "sigmas": torch.full((3,), 1.0)}
    with torch.no_grad():
        injection.attn1_patch(n, n, n, extra)
        out = injection.attn1_output_patch(a1, extra)
    assert out.shape == (3, 16, SPEC.dim)
    torch.testing.assert_close(out[0], out[2])
    torch.testing.assert_close(out[0:1], direct_adapter(injection, n[:1], a1[:1]))


def test_memory_kv_reuse_gives_identical_outputs_and_follows_weight_updates():
    reused = make_injection(chunks=None)
    fresh = make_injection(chunks=None, reuse_memory_kv=False)
    with torch.no_grad():
        _, out_a, _ = run_block(reused)
        _, out_b, _ = run_block(reused)
        _, out_c, _ = run_block(fresh)
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_c)
    assert len(reused._memo) == 1
    with torch.no_grad():
        reused.adapter.layer(SPEC.key).to_k.weight.mul_(2.0)  # in-place update, as an optimizer step does
        _, out_d, _ = run_block(reused)
        fresh.adapter.layer(SPEC.key).to_k.weight.mul_(2.0)
        _, out_e, _ = run_block(fresh)
    assert torch.equal(out_d, out_e) and not torch.equal(out_d, out_a)


def test_gradients_reach_only_adapter_parameters_through_the_patch():
    injection = make_injection(chunks=None)
    a1, out, _ = run_block(injection)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in injection.adapter.named_parameters()}
    touched = [name for name, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert touched and all(name.startswith("layers.output_blocks_4_1.") for name in touched)


def test_two_injections_stack_without_sharing_state():
    first = make_injection(seed=1, chunks=None)
    second = make_injection(seed=2, chunks=None)
    n = random_tensor(2, 16, SPEC.dim, seed=40)
    a1 = random_tensor(2, 16, SPEC.dim, seed=41)
    extra = {"block": ("output", 4), "block_index": 0, "cond_or_uncond": [0, 1], "sigmas": torch.full((2,), 1.0)}
    with torch.no_grad():
        for inj in (first, second):
            inj.attn1_patch(n, n, n, extra)
        out = second.attn1_output_patch(first.attn1_output_patch(a1, extra), extra)
        expected = direct_adapter(second, n, direct_adapter(first, n, a1))
    torch.testing.assert_close(out, expected)
    assert not math.isnan(float(out.sum()))


def test_memory_kv_memo_under_inference_mode_no_grad_and_training(tmp_path):
    """ComfyUI runs prompts in inference mode: an adapter loaded and a cache encoded there, the memo of the memory
    K/V filled there, then the same objects used with no_grad and with gradients (training from them)."""
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter, save_adapter

    path = str(tmp_path / "adapter.safetensors")
    save_adapter(build_adapter(TINY_SPECS, TINY_SIGNATURE).randomize_(seed=3), path)
    features = {s.key: random_tensor(1, s.channels, 4, 4, seed=i) for i, s in enumerate(TINY_SPECS)}
    with torch.inference_mode():  # what the loader, Encode and Apply nodes see
        adapter = load_adapter(path)
        cache = DreamCache(features, {}, {"signature": TINY_SIGNATURE})
        injection = DreamCacheInjection(adapter, cache, 1.0)
        first = injection.layer_memory(SPEC.key, "cpu", torch.float32)
        again = injection.layer_memory(SPEC.key, "cpu", torch.float32)
        a1, in_prompt, n = run_block(injection)
    assert all(x is y for x, y in zip(first[1:3], again[1:3])), "the memo was not reused inside inference mode"
    assert not any(p.is_inference() for p in adapter.parameters())
    assert not any(t.is_inference() for t in cache.features.values())
    assert not any(t.is_inference() for t in first[1:3])

    with torch.no_grad():  # outside the prompt, weights untouched: the same memo
        assert injection.layer_memory(SPEC.key, "cpu", torch.float32)[1] is first[1]
        torch.testing.assert_close(run_block(injection)[1], in_prompt, rtol=0, atol=0)

    # training: gradients through the memory of a cache encoded in inference mode
    adapter.requires_grad_(True)
    _, out, _ = run_block(injection)
    out.square().mean().backward()
    layer = adapter.layer(SPEC.key)
    assert layer.to_k.weight.grad is not None and layer.to_k.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.to_k.weight.add_(0.1)  # an optimizer step, in place
    adapter.requires_grad_(False)

    with torch.inference_mode():  # the next prompt sees the new weights, not the stale memo
        refreshed = injection.layer_memory(SPEC.key, "cpu", torch.float32)
        _, after, _ = run_block(injection)
    assert refreshed[1] is not first[1]
    expected_k, _ = layer.project_memory(cache.memory_tokens(SPEC.key, "cpu", torch.float32))
    torch.testing.assert_close(refreshed[1], expected_k.detach())
    assert (after - in_prompt).abs().max() > 1e-4


def test_the_pack_nests_its_patches_outside_a_token_merging_pair_in_either_order():
    """A pair that merges the queries in attn1_patch and unmerges in attn1_output_patch (as Token Merging and
    HyperTile do): with the model call's options made by the apply_model wrapper, DreamCache adapts the
    block's own tokens whichever pair was registered first; ComfyUI's raw order would hand it a merged layout."""
    import pytest

    from comfyui_dreamcache.dreamcache_core.method.patch import call_options

    def merge(n, context, value, extra):
        return n[:, ::2], context, value

    def unmerge(out, extra):
        return out.repeat_interleave(2, dim=1)

    injection = make_injection()
    n0 = random_tensor(2, 16, SPEC.dim, seed=40)
    expected = direct_adapter(injection, n0, unmerge(merge(n0, n0, n0, {})[0] * 2, {}))

    def run(first_ours: bool, wrapped: bool):
        pre, post = [merge], [unmerge]
        if first_ours:
            pre, post = [injection.attn1_patch] + pre, [injection.attn1_output_patch] + post
        else:
            pre, post = pre + [injection.attn1_patch], post + [injection.attn1_output_patch]
        options = {"patches": {"attn1_patch": pre, "attn1_output_patch": post}}
        if wrapped:
            options = call_options(options, torch.full((2,), 5.0))
            assert options["patches"]["attn1_patch"][0] is injection.attn1_patch
            assert options["patches"]["attn1_output_patch"][-1] is injection.attn1_output_patch
            assert pre[0] is (injection.attn1_patch if first_ours else merge), "the registered lists stay as they were"
        extra = dict(options, block=("output", 4), block_index=0, cond_or_uncond=[0], sigmas=torch.full((2,), 5.0),
                     n_heads=SPEC.heads, dim_head=SPEC.dim_head)
        n = context = value = n0
        for patch in extra["patches"]["attn1_patch"]:
            n, context, value = patch(n, context, value, extra)
        out = n * 2  # a token-wise stand-in for the attention
        for patch in extra["patches"]["attn1_output_patch"]:
            out = patch(out, extra)
        return out

    for first_ours in (True, False):
        torch.testing.assert_close(run(first_ours, wrapped=True), expected, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="token layout"):
            run(first_ours, wrapped=False)
