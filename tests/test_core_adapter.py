"""The adapter against DESIGN.md's equations, computed directly."""
import math

import torch
import torch.nn.functional as F

from comfyui_dreamcache.dreamcache_core.method.adapter import DreamCacheAdapter, build_adapter, check_adapter_fits
from core_fixtures import TINY_SIGNATURE, TINY_SPECS, random_norm1, random_tensor, sd15_specs


def direct_dreamcache_block(x, a1, memory, spec, p, gamma_m, beta_m):
    """m = MemAttn(LN_m(x), R); out = W_cat [a1 ; m] + b_cat, written out by hand."""
    ln = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ln_m = gamma_m * ln + beta_m
    q = ln_m @ p["to_q"].T
    k = memory @ p["to_k"].T
    v = memory @ p["to_v"].T
    heads, dh = spec.heads, spec.dim_head
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh), dim=-1)
        out.append(weights @ v[..., sl])
    m = torch.cat(out, -1) @ p["to_out_w"].T + p["to_out_b"]
    return torch.cat([a1, m], -1) @ p["cat_w"].T + p["cat_b"]


def test_adapter_equals_direct_equations_with_folded_layer_norm():
    spec = TINY_SPECS[0]
    adapter = DreamCacheAdapter([spec], norm_folded=False).randomize_(seed=3)
    layer = adapter.layer(spec.key)
    gamma_m = layer.mem_norm_scale.detach().clone() + 1.0
    beta_m = layer.mem_norm_shift.detach().clone()
    with torch.no_grad():
        layer.mem_norm_scale.copy_(gamma_m)
    norm1 = random_norm1(spec, seed=5)
    adapter.fold_norms({spec.key: norm1})

    x = random_tensor(2, 10, spec.dim, seed=1) * 3 + 0.5
    a1 = random_tensor(2, 10, spec.dim, seed=2)
    memory = random_tensor(1, 7, spec.channels, seed=4)
    n = norm1(x)
    k, v = layer.project_memory(memory)
    got = layer(n, a1, k, v)
    params = {"to_q": layer.to_q.weight, "to_k": layer.to_k.weight, "to_v": layer.to_v.weight,
              "to_out_w": layer.to_out.weight, "to_out_b": layer.to_out.bias,
              "cat_w": layer.linear_cat.weight, "cat_b": layer.linear_cat.bias}
    expected = direct_dreamcache_block(x, a1, memory.expand(2, -1, -1), spec, params, gamma_m, beta_m)
    assert got.shape == (2, 10, spec.dim)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the memory really matters: another reference gives another output
    k2, v2 = layer.project_memory(random_tensor(1, 7, spec.channels, seed=9))
    assert (layer(n, a1, k2, v2) - got).abs().max() > 1e-3


def test_folded_norm_reproduces_layer_norm_of_x():
    spec = TINY_SPECS[1]
    adapter = DreamCacheAdapter([spec], norm_folded=False)
    gamma_m = 1 + 0.5 * random_tensor(spec.dim, seed=11)
    beta_m = 0.5 * random_tensor(spec.dim, seed=12)
    with torch.no_grad():
        adapter.layer(spec.key).mem_norm_scale.copy_(gamma_m)
        adapter.layer(spec.key).mem_norm_shift.copy_(beta_m)
    norm1 = random_norm1(spec, seed=13)
    adapter.fold_norms({spec.key: norm1})
    x = random_tensor(3, 5, spec.dim, seed=14) * 2 - 1
    layer = adapter.layer(spec.key)
    via_n = norm1(x) * layer.mem_norm_scale + layer.mem_norm_shift
    direct = F.layer_norm(x, (spec.dim,), gamma_m, beta_m)
    torch.testing.assert_close(via_n, direct, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_is_bit_exact_identity():
    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE, seed=0)
    for spec in TINY_SPECS:
        layer = adapter.layer(spec.key)
        a1 = random_tensor(2, 9, spec.dim, seed=7) * 10
        n = random_tensor(2, 9, spec.dim, seed=8)
        k, v = layer.project_memory(random_tensor(1, 6, spec.channels, seed=9))
        out = layer(n, a1, k, v)
        assert torch.equal(out, a1)
        # the memory path itself is live (random weights), only W_cat = [I | 0] hides it
        assert layer.to_q.weight.abs().sum() > 0 and layer.linear_cat.weight[:, spec.dim:].abs().sum() == 0


def test_fresh_adapter_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_adapter(TINY_SPECS, seed=4)
    after = torch.rand(1)
    b = build_adapter(TINY_SPECS, seed=4)
    assert torch.equal(expected_next, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_sd15_layer_set_has_about_25m_parameters():
    adapter = DreamCacheAdapter(sd15_specs())
    count = adapter.parameter_count()
    # per layer: LN_m 2d + W_q,W_k,W_v 3d^2 + W_o d^2+d + W_cat 2d^2+d = 6d^2 + 4d
    expected = sum(6 * d * d + 4 * d for d in (1280, 1280, 640, 640, 320))
    assert count == expected
    assert 25.0e6 < count < 25.4e6


class FakeSpecsModel:
    pass


def test_adapter_check_rejects_other_heads(monkeypatch):
    from comfyui_dreamcache.dreamcache_core.method import layers

    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE)
    other = [layers.MemoryLayerSpec(s.key, s.block, s.channels, s.dim, s.heads * 2, s.dim_head // 2) for s in TINY_SPECS]
    monkeypatch.setattr(layers, "discover_memory_layers", lambda model: other)
    monkeypatch.setattr(layers, "model_signature", lambda model: dict(TINY_SIGNATURE))
    try:
        check_adapter_fits(adapter, FakeSpecsModel())
    except ValueError as error:
        assert "another base model" in str(error) and "heads" in str(error)
    else:
        raise AssertionError("an adapter with other heads was accepted")
    monkeypatch.setattr(layers, "discover_memory_layers", lambda model: TINY_SPECS[:2])
    try:
        check_adapter_fits(adapter, FakeSpecsModel())
    except ValueError as error:
        assert "another base model" in str(error)
    else:
        raise AssertionError("an adapter with other layers was accepted")
