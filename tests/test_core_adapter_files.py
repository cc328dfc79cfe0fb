"""Adapter files: our safetensors, the authors' .pt (read, written back, converted), and bad files."""
import json

import pytest
import torch
import torch.nn.functional as F

from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
from comfyui_dreamcache.dreamcache_core.io.adapter_io import AdapterFileError, adapter_state_dict, load_adapter, save_adapter
from comfyui_dreamcache.dreamcache_core.io.adapter_tensors import TENSOR_NAMES
from comfyui_dreamcache.dreamcache_core.io.authors_adapter_format import (AUTHORS_BLOCK, AUTHORS_PREFIX,
                                                                       adapter_from_authors_state_dict,
                                                                       authors_specs_from_state_dict,
                                                                       authors_state_dict)
from core_fixtures import TINY_SIGNATURE, TINY_SPECS, authors_checkpoint, random_norm1, random_tensor


def test_safetensors_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE).randomize_(seed=1)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.keys() == adapter.keys()
    assert loaded.specs == adapter.specs
    assert loaded.signature == TINY_SIGNATURE
    before, after = adapter_state_dict(adapter), adapter_state_dict(loaded)
    assert before.keys() == after.keys() and len(before) == len(TINY_SPECS) * len(TENSOR_NAMES)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    from safetensors import safe_open
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    assert meta["dreamcache_format"] == "adapter" and meta["dreamcache_version"] == "1"
    assert json.loads(meta["layers"])[1] == TINY_SPECS[1].to_json()


class FakeBase(torch.nn.Module):
    """Stands in for a base model: discover_memory_layers / memory_norm1 are patched to read it."""

    def __init__(self):
        super().__init__()
        self.norms = {spec.key: random_norm1(spec, seed=i + 20) for i, spec in enumerate(TINY_SPECS)}


@pytest.fixture
def fake_base(monkeypatch):
    from comfyui_dreamcache.dreamcache_core.method import layers
    base = FakeBase()
    monkeypatch.setattr(layers, "discover_memory_layers", lambda model: list(TINY_SPECS))
    monkeypatch.setattr(layers, "memory_norm1", lambda model: model.norms)
    monkeypatch.setattr(layers, "model_signature", lambda model: dict(TINY_SIGNATURE))
    return base


def test_authors_checkpoint_round_trip_and_layer_norm_folding(tmp_path, fake_base):
    state = authors_checkpoint(seed=3)
    path = str(tmp_path / "cross_attention-1000.pt")
    torch.save(state, path)
    adapter = load_adapter(path, base_model=fake_base)
    assert adapter.norm_folded and adapter.keys() == [s.key for s in TINY_SPECS]
    # every tensor comes back in their layout, LN_m unfolded again
    written = authors_state_dict(adapter, fake_base.norms)
    assert written.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(written[key], state[key], rtol=1e-5, atol=1e-6, msg=key)
    # the folding is exact against LN_m applied to x
    for spec in TINY_SPECS:
        prefix = f"{AUTHORS_PREFIX}{spec.key}{AUTHORS_BLOCK}"
        x = random_tensor(2, 6, spec.dim, seed=5) * 4 + 1
        layer = adapter.layer(spec.key)
        via_norm1 = fake_base.norms[spec.key](x) * layer.mem_norm_scale + layer.mem_norm_shift
        direct = F.layer_norm(x, (spec.dim,), state[prefix + "norm2_mem.weight"], state[prefix + "norm2_mem.bias"])
        torch.testing.assert_close(via_norm1, direct, rtol=1e-4, atol=1e-5)
    # and our safetensors written from it loads back to the same tensors
    out = str(tmp_path / "converted.safetensors")
    save_adapter(adapter, out)
    again = load_adapter(out)
    for key, tensor in adapter_state_dict(adapter).items():
        assert torch.equal(adapter_state_dict(again)[key], tensor)


def test_authors_checkpoint_without_base_stays_unfolded_and_reads_heads_of_64():
    prefix = f"{AUTHORS_PREFIX}output_blocks.4.1{AUTHORS_BLOCK}"
    state = {prefix + "attn_mem.to_q.weight": torch.randn(128, 128), prefix + "attn_mem.to_k.weight": torch.randn(128, 96),
             prefix + "attn_mem.to_v.weight": torch.randn(128, 96), prefix + "attn_mem.to_out.0.weight": torch.randn(128, 128),
             prefix + "attn_mem.to_out.0.bias": torch.randn(128), prefix + "norm2_mem.weight": torch.randn(128),
             prefix + "norm2_mem.bias": torch.randn(128), prefix + "linear_cat.weight": torch.randn(128, 256),
             prefix + "linear_cat.bias": torch.randn(128)}
    adapter = adapter_from_authors_state_dict(state)
    assert not adapter.norm_folded
    (spec,) = authors_specs_from_state_dict(state)
    assert (spec.key, spec.block, spec.dim, spec.channels, spec.heads, spec.dim_head) == (
        "output_blocks.4.1", ("output", 4), 128, 96, 2, 64)
    assert torch.equal(adapter.layer(spec.key).mem_norm_scale, state[prefix + "norm2_mem.weight"])
    with pytest.raises(ValueError, match="fold"):
        save_adapter(adapter, "/tmp/never-written.safetensors")


class PicklePayload:
    """Not a tensor: loading it would need pickle."""


def test_pt_that_needs_pickle_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"x": PicklePayload()}, path)
    with pytest.raises(AdapterFileError, match="needs pickle"):
        load_adapter(path)


def test_pt_in_another_layout_is_refused(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"model.weight": torch.zeros(2)}, path)
    with pytest.raises(AdapterFileError, match="authors' DreamCache layout"):
        load_adapter(path)


def test_truncated_safetensors_is_refused_with_advice(tmp_path):
    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(adapter, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        load_adapter(path)


def test_foreign_safetensors_and_unknown_extension_are_refused(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(AdapterFileError, match="not a DreamCache adapter"):
        load_adapter(path)
    other = tmp_path / "adapter.onnx"
    other.write_bytes(b"xx")
    with pytest.raises(AdapterFileError, match="neither"):
        load_adapter(str(other))


def test_convert_authors_cli_reads_the_base_checkpoint_and_folds(tmp_path):
    from safetensors.torch import save_file
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.convert_authors import main
    from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec
    sd2_specs = [MemoryLayerSpec("middle_block.1", ("middle", 0), 128, 128, 2, 64),
                 MemoryLayerSpec("output_blocks.4.1", ("output", 4), 128, 128, 2, 64),
                 MemoryLayerSpec("output_blocks.6.1", ("output", 6), 64, 64, 1, 64)]
    state = authors_checkpoint(seed=8, specs=sd2_specs)
    adapter_path = str(tmp_path / "cross_attention-5.pt")
    torch.save(state, adapter_path)
    base = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(16, 4, 3, 3)}
    norms = {}
    for i, spec in enumerate(sd2_specs):
        block0 = f"model.diffusion_model.{spec.key}.transformer_blocks.0."
        norms[spec.key] = random_norm1(spec, seed=30 + i)
        base[block0 + "norm1.weight"] = norms[spec.key].weight.detach().clone()
        base[block0 + "norm1.bias"] = norms[spec.key].bias.detach().clone()
        base[block0 + "attn2.to_k.weight"] = torch.zeros(spec.dim, 1024)
        base[f"model.diffusion_model.{spec.key}.proj_in.weight"] = torch.zeros(spec.dim, spec.channels)
    base_path = str(tmp_path / "base.safetensors")
    save_file(base, base_path)
    out = str(tmp_path / "out" / "dreamcache.safetensors")
    assert main(["--adapter", adapter_path, "--base", base_path, "--out", out]) == 0
    adapter = load_adapter(out)
    assert adapter.signature["context_dim"] == 1024 and adapter.signature["model_channels"] == 16
    assert list(adapter.specs.values()) == sd2_specs
    for spec in sd2_specs:
        prefix = f"{AUTHORS_PREFIX}{spec.key}{AUTHORS_BLOCK}"
        x = random_tensor(1, 4, spec.dim, seed=2) * 3
        layer = adapter.layer(spec.key)
        via_norm1 = norms[spec.key](x) * layer.mem_norm_scale + layer.mem_norm_shift
        direct = F.layer_norm(x, (spec.dim,), state[prefix + "norm2_mem.weight"], state[prefix + "norm2_mem.bias"])
        torch.testing.assert_close(via_norm1, direct, rtol=1e-4, atol=1e-5)
    assert main(["--adapter", base_path, "--base", base_path, "--out", out]) == 2
