"""The adapter against the method's equations (dreamcache_core/method/adapter.py's docstring), computed directly."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comfyui_dreamcache.dreamcache_core.method.adapter import DreamCacheAdapter, build_adapter, check_adapter_fits
from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec
from core_fixtures import SD15_WIDTHS, TINY_SIGNATURE, TINY_SPECS, random_norm1, random_tensor, sd15_specs


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


# --- base families: which model an adapter is for, in words a user knows ---------------------------------------

SDXL_WIDTHS = [("middle_block.1", ("middle", 0), 1280), ("output_blocks.1.1", ("output", 1), 1280),
               ("output_blocks.3.1", ("output", 3), 640), ("output_blocks.5.1", ("output", 5), 640)]


def sd2_specs():
    return [MemoryLayerSpec(k, b, w, w, w // 64, 64) for k, b, w in SD15_WIDTHS]


def sdxl_specs():
    return [MemoryLayerSpec(k, b, w, w, w // 64, 64) for k, b, w in SDXL_WIDTHS]


def signature_of(specs, context_dim):
    return {"context_dim": context_dim, "model_channels": 320, "in_channels": 4,
            "layers": [s.to_json() for s in specs]}


class FakeSpatialTransformer(nn.Module):
    """What layers.py reads of a ComfyUI SpatialTransformer (weights on the meta device: shapes only)."""

    def __init__(self, width, heads, context_dim):
        super().__init__()
        self.in_channels = width
        self.norm = nn.Identity()
        self.proj_in = nn.Identity()
        block = nn.Module()
        block.n_heads, block.d_head = heads, width // heads
        block.norm1 = nn.LayerNorm(width, device="meta")
        block.attn2 = nn.Module()
        block.attn2.to_k = nn.Linear(context_dim, width, bias=False, device="meta")
        self.transformer_blocks = nn.ModuleList([block])


def fake_unet(decoder_widths, middle_width, context_dim, heads):
    """A U-Net-shaped module: a middle transformer and one transformer per decoder block ([resblock, transformer]),
    laid out like SD1.5 (12 decoder blocks, no attention in the first 3) or SDXL (9, no attention in the last 3)."""
    unet = nn.Module()
    unet.model_channels, unet.in_channels = 320, 4
    unet.input_blocks = nn.ModuleList([nn.ModuleList([nn.Identity()])])
    unet.middle_block = nn.ModuleList([nn.Identity(), FakeSpatialTransformer(middle_width, heads(middle_width),
                                                                             context_dim), nn.Identity()])
    unet.output_blocks = nn.ModuleList([
        nn.ModuleList([nn.Identity()] + ([FakeSpatialTransformer(w, heads(w), context_dim)] if w else []))
        for w in decoder_widths])
    return unet


def fake_sd15_unet():
    return fake_unet([0, 0, 0, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320], 1280, 768, lambda w: 8)


def fake_sdxl_unet():
    return fake_unet([1280, 1280, 1280, 640, 640, 640, 0, 0, 0], 1280, 2048, lambda w: w // 64)


def test_family_is_named_from_text_width_and_memory_layers():
    from comfyui_dreamcache.dreamcache_core.method.base_family import base_family
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    assert base_family(signature_of(sd15_specs(), 768)) == "SD1.5"
    assert base_family(signature_of(sd2_specs(), 1024)) == "SD2.x"
    assert base_family(signature_of(sdxl_specs(), 2048)) == "SDXL"
    assert base_family(specs=sdxl_specs(), context_dim=2048) == "SDXL"
    # the layers must fit the family the text width names: SDXL's text width on SD1.5's layers is no SDXL
    assert base_family(specs=sd15_specs(), context_dim=2048) == "an unknown base (text width 2048)"
    assert base_family(signature_of(TINY_SPECS, 16)) == "an unknown base (text width 16)"
    # an authors' checkpoint read without its base records no text width: full-size layers still tell
    assert base_family(specs=sd2_specs()) == "SD1.5 or SD2.x"
    assert base_family(specs=sdxl_specs()) == "SDXL"
    assert base_family(specs=TINY_SPECS) == "an unknown base"
    # and what the model discovery reads off U-Net-shaped modules
    sd15, sdxl = fake_sd15_unet(), fake_sdxl_unet()
    assert [s.key for s in discover_memory_layers(sd15)] == [k for k, _, _ in SD15_WIDTHS]
    assert [s.key for s in discover_memory_layers(sdxl)] == [k for k, _, _ in SDXL_WIDTHS]
    assert base_family(model_signature(sd15)) == "SD1.5"
    assert base_family(model_signature(sdxl)) == "SDXL"


def test_describe_adapter_names_family_layers_widths_and_parameters():
    from comfyui_dreamcache.dreamcache_core.method.base_family import describe_adapter

    sdxl = DreamCacheAdapter(sdxl_specs(), signature_of(sdxl_specs(), 2048))
    text = describe_adapter(sdxl)
    lines = text.splitlines()
    assert lines[0] == "DreamCache adapter for SDXL"
    assert "text width: 2048" in lines
    assert "memory layers: 4 (middle.0, output.1, output.3, output.5)" in lines
    assert "layer widths: 1280 (20 heads of 64), 640 (10 heads of 64)" in lines
    expected = sum(6 * d * d + 4 * d for d in (1280, 1280, 640, 640))
    assert sdxl.parameter_count() == expected
    assert "parameters: 24.59M" in lines
    assert "norms: folded" in text and "authors'" not in text

    sd15 = DreamCacheAdapter(sd15_specs(), signature_of(sd15_specs(), 768), norm_folded=False)
    text = describe_adapter(sd15)
    assert text.startswith("DreamCache adapter for SD1.5\n") and "text width: 768" in text
    assert "memory layers: 5 (middle.0, output.4, output.6, output.8, output.10)" in text
    assert "1280 (8 heads of 160), 640 (8 heads of 80), 320 (8 heads of 40)" in text
    assert "parameters: 25.21M" in text
    assert "authors' checkpoint" in text and "folded against the model's norm1" in text

    tiny = describe_adapter(DreamCacheAdapter(TINY_SPECS, TINY_SIGNATURE))
    assert tiny.startswith("DreamCache adapter for an unknown base (text width 16)\n")
    assert "memory layers: 3 (middle.0, output.4, output.6)" in tiny
    assert "not recorded" in describe_adapter(DreamCacheAdapter(TINY_SPECS))


def test_sdxl_adapter_on_sd15_model_names_both_bases():
    from comfyui_dreamcache.dreamcache_core.method.layers import discover_memory_layers, model_signature

    sdxl = fake_sdxl_unet()
    adapter = DreamCacheAdapter(discover_memory_layers(sdxl), model_signature(sdxl))
    check_adapter_fits(adapter, sdxl)  # its own base is fine
    with pytest.raises(ValueError) as error:
        check_adapter_fits(adapter, fake_sd15_unet())
    message = str(error.value)
    assert message.startswith("This DreamCache adapter was made for another base model: it was trained for SDXL "
                              "(text width 2048, 4 memory layers), but the model is SD1.5 (text width 768, 5 memory "
                              "layers).")
    assert "middle.0, output.1, output.3, output.5" in message
    assert "middle.0, output.4, output.6, output.8, output.10" in message
    assert message.endswith("Load an adapter trained for SD1.5, or use an SDXL checkpoint.")


def test_mismatch_messages_name_both_bases_for_each_check(monkeypatch):
    """Layers differ, widths/heads differ, text width differs: each says what the adapter and the model are."""
    from comfyui_dreamcache.dreamcache_core.method import layers

    def model_with(specs, context_dim):
        monkeypatch.setattr(layers, "discover_memory_layers", lambda model: list(specs))
        monkeypatch.setattr(layers, "model_signature", lambda model: signature_of(specs, context_dim))

    def message(adapter):
        with pytest.raises(ValueError) as error:
            check_adapter_fits(adapter, FakeSpecsModel())
        return str(error.value)

    sd2 = DreamCacheAdapter(sd2_specs(), signature_of(sd2_specs(), 1024))
    model_with(sd15_specs(), 768)  # same layers, other heads (SD2.x heads of 64, SD1.5 8 heads)
    text = message(sd2)
    assert "trained for SD2.x (text width 1024, 5 memory layers), but the model is SD1.5 (text width 768" in text
    assert "Layer middle_block.1 is 1280 wide with 20 heads of 64" in text and "8 heads of 160" in text
    assert text.endswith("Load an adapter trained for SD1.5, or use an SD2.x checkpoint.")

    model_with(sd2_specs(), 768)  # same layers and heads, other text encoder
    text = message(sd2)
    assert "made for another base model" in text and "text width 1024 vs 768" in text
    assert "the model is SD1.5 (text width 768, 5 memory layers)" in text

    model_with(sd15_specs(), 5)  # a base of no known family
    text = message(DreamCacheAdapter(sdxl_specs(), signature_of(sdxl_specs(), 2048)))
    assert ("but the model is an unknown base (text width 5, 5 memory layers placed as in SD1.5/SD2.x)" in text)
    assert text.endswith("Load an adapter trained for this model's base, or use an SDXL checkpoint.")

    unfolded = DreamCacheAdapter(sd2_specs(), norm_folded=False)  # an authors' .pt read without its base
    model_with(sd15_specs(), 768)
    text = message(unfolded)
    assert "trained for SD1.5 or SD2.x (text width not recorded, 5 memory layers)" in text
    assert "convert_authors" in text
