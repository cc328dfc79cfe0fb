"""Bad input without ComfyUI: non-finite numbers and tensors, files that would allocate far more
than they hold, broken metadata and layouts, the dataset CLI's errors and manifests leaving their folder.
One test per class of problem, parametrised over examples; every test asserts the message."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
from comfyui_dreamcache.dreamcache_core.io.adapter_io import AdapterFileError, adapter_state_dict, load_adapter, save_adapter
from comfyui_dreamcache.dreamcache_core.io.authors_adapter_format import (AUTHORS_BLOCK, AUTHORS_PREFIX,
                                                                       adapter_from_authors_state_dict)
from comfyui_dreamcache.dreamcache_core.io.cache_files import CacheFileError, load_cache, save_cache
from comfyui_dreamcache.dreamcache_core.method.cache import DreamCache, combine_caches, parse_reference_weights
from comfyui_dreamcache.dreamcache_core.method.controls import layer_strengths, prepare_region_mask
from comfyui_dreamcache.dreamcache_core.method.input_checks import LAYER_WEIGHT_LIMIT, check_number
from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec
from core_fixtures import TINY_SIGNATURE, TINY_SPECS, random_tensor
from core_fixtures import authors_checkpoint, tiny_cache

NAN, INF = float("nan"), float("inf")
PACK_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- non-finite numbers given as inputs

@pytest.mark.parametrize("call, match", [
    (lambda: check_number(NAN, "strength"), r"strength is nan, not a finite number"),
    (lambda: check_number(INF, "text_cfg", advice="The authors use 7.5."), r"text_cfg is inf.*authors use 7\.5"),
    (lambda: check_number(3.0, "end_percent", 0.0, 1.0), r"end_percent is 3\.0, outside its range.*between 0 and 1"),
    (lambda: layer_strengths(TINY_SPECS, 1.0, 1.0, "decoder=1e30"), r"'decoder=1e30' is beyond \+-100"),
    (lambda: layer_strengths(TINY_SPECS, 1.0, 1.0, "middle=nan"), r"'middle=nan' is not finite"),
    (lambda: layer_strengths(TINY_SPECS, 1.0, 1.0, "output.4=-inf"), r"'output.4=-inf' is not finite"),
    (lambda: parse_reference_weights("nan, 1", 2), r"finite and >= 0"),
    (lambda: parse_reference_weights("1, inf", None), r"finite and >= 0"),
    (lambda: combine_caches([tiny_cache(), tiny_cache(seed=1)], [NAN, 1.0]), r"finite and >= 0"),
    (lambda: prepare_region_mask(torch.full((8, 8), NAN)), r"attention mask \(attn_mask\) holds 64 NaN value"),
    (lambda: prepare_region_mask(torch.tensor([[1.0, INF]])), r"attention mask \(attn_mask\) holds 1 infinite"),
])
def test_non_finite_or_huge_numbers_are_refused_naming_the_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_layer_weights_up_to_the_documented_bound_still_work():
    assert LAYER_WEIGHT_LIMIT == 100.0
    strengths = layer_strengths(TINY_SPECS, 1.0, 1.0, f"decoder={LAYER_WEIGHT_LIMIT}, middle=-{LAYER_WEIGHT_LIMIT}")
    assert strengths == {"middle_block.1": -100.0, "output_blocks.4.1": 100.0, "output_blocks.6.1": 100.0}


# ---------------------------------------------------------------- non-finite tensors read from files

def _adapter_file_with(tmp_path, tensor_name, value):
    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE).randomize_(seed=1)
    with torch.no_grad():
        dict(adapter.layer("output_blocks.4.1").named_parameters())[tensor_name].view(-1)[3] = value
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(adapter, path)
    return path


def _cache_file_with(tmp_path, value):
    cache = tiny_cache(num_refs=2)
    cache.features["output_blocks.6.1"].view(-1)[5] = value
    path = str(tmp_path / "cache.safetensors")
    save_cache(cache, path)
    return path


SD2_LAYOUT = [MemoryLayerSpec("middle_block.1", ("middle", 0), 64, 64, 1, 64),
              MemoryLayerSpec("output_blocks.4.1", ("output", 4), 96, 128, 2, 64)]  # heads of 64, as in SD2.x


def _authors_file_with(tmp_path, value):
    state = authors_checkpoint(seed=2, specs=SD2_LAYOUT)
    state[f"{AUTHORS_PREFIX}middle_block.1{AUTHORS_BLOCK}linear_cat.bias"][0] = value
    path = str(tmp_path / "cross_attention-1.pt")
    torch.save(state, path)
    return path


@pytest.mark.parametrize("make, load, error, match", [
    (lambda p: _adapter_file_with(p, "to_k.weight", NAN), load_adapter, AdapterFileError,
     r"adapter.safetensors: tensor output_blocks.4.1.to_k.weight holds 1 NaN value"),
    (lambda p: _adapter_file_with(p, "linear_cat.bias", -INF), load_adapter, AdapterFileError,
     r"tensor output_blocks.4.1.linear_cat.bias holds 1 infinite value.*use another checkpoint"),
    (lambda p: _cache_file_with(p, NAN), load_cache, CacheFileError,
     r"cache.safetensors: features.output_blocks.6.1 holds 1 NaN value.*Save the cache again"),
    (lambda p: _cache_file_with(p, INF), load_cache, CacheFileError, r"features.output_blocks.6.1 holds 1 infinite"),
    (lambda p: _authors_file_with(p, NAN), load_adapter, AdapterFileError,
     r"cross_attention-1.pt: tensor middle_block.1.linear_cat.bias holds 1 NaN"),
])
def test_non_finite_tensors_in_files_are_refused_naming_the_tensor(tmp_path, make, load, error, match):
    path = make(tmp_path)
    with pytest.raises(error, match=match):
        load(path)


# ---------------------------------------------------------------- small files that would allocate huge memory

def _huge_metadata_adapter(path, width):
    """A valid tiny adapter file whose metadata claims one layer ``width`` wide (the tensors stay tiny)."""
    from safetensors.torch import save_file

    adapter = build_adapter(TINY_SPECS[:1], TINY_SIGNATURE)
    spec = TINY_SPECS[0]
    forged = MemoryLayerSpec(spec.key, spec.block, width, width, 8, width // 8)
    metadata = {"dreamcache_format": "adapter", "dreamcache_version": "1",
                "layers": json.dumps([forged.to_json()]), "signature": json.dumps(TINY_SIGNATURE)}
    save_file(adapter_state_dict(adapter), path, metadata=metadata)


def _stride_zero_authors(path, width):
    """The authors' layout for one ``width``-wide layer, every tensor a stride-0 expansion of one number."""
    prefix = f"{AUTHORS_PREFIX}middle_block.1{AUTHORS_BLOCK}"
    shapes = {"attn_mem.to_q.weight": (width, width), "attn_mem.to_k.weight": (width, width),
              "attn_mem.to_v.weight": (width, width), "attn_mem.to_out.0.weight": (width, width),
              "attn_mem.to_out.0.bias": (width,), "norm2_mem.weight": (width,), "norm2_mem.bias": (width,),
              "linear_cat.weight": (width, 2 * width), "linear_cat.bias": (width,)}
    torch.save({prefix + k: torch.zeros(1).expand(*shape) for k, shape in shapes.items()}, path)


PEAK_PROBE = textwrap.dedent("""
    import resource, sys
    sys.path[:0] = [{tests!r}, {parent!r}]
    import conftest
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import AdapterFileError, load_adapter
    import test_core_bad_input as here
    getattr(here, {make!r})({path!r}, {width})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_adapter({path!r})
        print("LOADED")
    except AdapterFileError as error:
        print("REFUSED", error)
    print("PEAK_GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


@pytest.mark.parametrize("make, width, filename, match", [
    # inside the width bound, so only the shapes of the tensors in the file can tell: 8000 wide would be 1.5 GB
    ("_huge_metadata_adapter", 8000, "adapter.safetensors", r"has shape \(48,\), expected \(8000,\) from the layer"),
    ("_huge_metadata_adapter", 10 ** 9, "adapter.safetensors", r"width 1000000000.*must lie in 1\.\.8192"),
    ("_stride_zero_authors", 4096, "cross_attention-9.pt", r"shape \(4096, 4096\) .*stored in 4 bytes.*refused"),
])
def test_small_files_declaring_huge_layers_are_refused_within_a_few_mb(tmp_path, make, width, filename, match):
    """The loader runs in a child process; its peak resident memory may grow by a few MB at most."""
    import re

    path = str(tmp_path / filename)
    probe = PEAK_PROBE.format(tests=TESTS, parent=PACK_PARENT, make=make, path=path, width=width)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(path) < 64 * 1024
    assert "REFUSED" in result.stdout and "LOADED" not in result.stdout, result.stdout
    assert re.search(match, result.stdout), result.stdout
    growth_kb = int(result.stdout.split("PEAK_GROWTH_KB")[1])
    assert growth_kb < 8 * 1024, f"the loader's peak memory grew by {growth_kb} KB"


def test_authors_tensors_sharing_one_full_storage_still_load():
    """Views that each fit their storage are not a bomb: they load like separate tensors."""
    state = authors_checkpoint(seed=4, specs=SD2_LAYOUT)
    big = torch.cat([t.flatten() for t in state.values()])
    offset, shared = 0, {}
    for key, tensor in state.items():
        shared[key] = big[offset:offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
    loaded, expected = adapter_from_authors_state_dict(shared), adapter_from_authors_state_dict(state)
    for key, tensor in adapter_state_dict(expected).items():
        assert torch.equal(adapter_state_dict(loaded)[key], tensor)


# ---------------------------------------------------------------- raw errors become clear messages

def _adapter_with_metadata(tmp_path, **changes):
    from safetensors.torch import save_file

    adapter = build_adapter(TINY_SPECS, TINY_SIGNATURE)
    metadata = {"dreamcache_format": "adapter", "dreamcache_version": "1",
                "layers": json.dumps([s.to_json() for s in TINY_SPECS]), "signature": json.dumps(TINY_SIGNATURE)}
    metadata.update(changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    path = str(tmp_path / "adapter.safetensors")
    save_file(adapter_state_dict(adapter), path, metadata=metadata)
    return lambda: load_adapter(path)


def _cache_with(tmp_path, metadata=None, mask_tokens=None):
    from safetensors.torch import save_file

    cache = tiny_cache(num_refs=1)
    tensors = {f"features.{k}": v for k, v in cache.features.items()}
    if mask_tokens is not None:
        tensors["token_mask.output_blocks.4.1"] = torch.ones(1, mask_tokens, dtype=torch.uint8)
    meta = {"dreamcache_format": "cache", "dreamcache_version": "1", "metadata": metadata or "{}"}
    path = str(tmp_path / "cache.safetensors")
    save_file(tensors, path, metadata=meta)
    return lambda: load_cache(path)


def _authors_with(tmp_path, change):
    state = authors_checkpoint(seed=1, specs=SD2_LAYOUT)
    change(state)
    path = str(tmp_path / "cross_attention-7.pt")
    torch.save(state, path)
    return lambda: load_adapter(path)


def _authors_sd15_tiny_widths():
    """The authors' layout for a base 40 wide with heads of 8 channels (like the tiny test U-Nets)."""
    spec = MemoryLayerSpec("output_blocks.4.1", ("output", 4), 40, 40, 5, 8)
    return authors_checkpoint(seed=3, specs=[spec])


def _set(key, value):
    return lambda state: state.__setitem__(f"{AUTHORS_PREFIX}{key}", value)


@pytest.mark.parametrize("make, error, match", [
    (lambda p: _adapter_with_metadata(p, layers=None), AdapterFileError, r"lacks the 'layers' metadata field"),
    (lambda p: _adapter_with_metadata(p, layers="[{not json"), AdapterFileError, r"not valid JSON.*save or convert"),
    (lambda p: _adapter_with_metadata(p, signature="{"), AdapterFileError, r"not valid JSON"),
    (lambda p: _adapter_with_metadata(p, layers=json.dumps([{"key": "middle_block.1", "block": ["middle", 0]}])),
     AdapterFileError, r"a layer description lacks the field 'channels'"),
    (lambda p: _adapter_with_metadata(p, layers=json.dumps([dict(TINY_SPECS[0].to_json(), dim="wide")])),
     AdapterFileError, r"a layer description is malformed"),
    (lambda p: _cache_with(p, metadata="{oops"), CacheFileError, r"'metadata' field is not valid JSON.*Save the cache"),
    (lambda p: _cache_with(p, mask_tokens=15), CacheFileError,
     r"token mask of layer output_blocks.4.1 has shape \(1, 15\).*4x4 tokens, which needs \(1, 16\)"),
    (lambda p: _authors_with(p, _set(f"middle_block.1{AUTHORS_BLOCK}attn_mem.to_q.weight", [[1.0]])),
     AdapterFileError, r"attn_mem.to_q.weight is a list, not a tensor"),
    (lambda p: _authors_with(p, _set(f"output_blocks.4.1{AUTHORS_BLOCK}norm2_mem.bias", 0.5)),
     AdapterFileError, r"norm2_mem.bias is a float, not a tensor"),
    (lambda p: _authors_with(p, lambda s: (s.clear(), s.update(_authors_sd15_tiny_widths()))), AdapterFileError,
     r"attention width 40, not a multiple of 64.*does not fit the head layout.*file itself may be fine.*--base"),
])
def test_broken_metadata_and_layouts_get_a_clear_message(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path)()


@pytest.mark.parametrize("weights", ["1e308, 1.7e308", "1e-320, 1e300"])
def test_reference_weights_too_far_apart_say_so_instead_of_a_math_error(weights):
    with pytest.raises(ValueError, match=r"too large or too far apart.*scale them"):
        parse_reference_weights(weights, 2)
    cache = DreamCache({s.key: random_tensor(2, s.channels, 2, 2) for s in TINY_SPECS}, {})
    with pytest.raises(ValueError, match=r"too large or too far apart"):
        cache.with_reference_weights([float(w) for w in weights.split(",")])
    assert parse_reference_weights("1e300, 1e300", 2) == [1e300, 1e300]  # large but computable: kept


def test_a_cache_whose_token_mask_does_not_fit_its_features_fails_when_built():
    features = {s.key: random_tensor(1, s.channels, 4, 4) for s in TINY_SPECS}
    with pytest.raises(ValueError, match=r"token mask of layer middle_block.1 has shape \(1, 9\)"):
        DreamCache(features, {"middle_block.1": torch.ones(1, 9, dtype=torch.bool)})
    with pytest.raises(ValueError, match="different numbers of references"):
        DreamCache(dict(features, **{"middle_block.1": random_tensor(2, 48, 4, 4)}), {})


# ---------------------------------------------------------------- the dataset builder's command line

def test_dataset_cli_reports_a_missing_folder_in_one_line_with_exit_code_2(tmp_path, capsys):
    from comfyui_dreamcache.dreamcache_core.training.dataset import main

    assert main(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error: --images" in err and "nowhere is not a folder" in err and "Give the folder" in err
    assert main(["--validate", str(tmp_path / "none.jsonl")]) == 2
    assert "Manifest not found" in capsys.readouterr().err
    shell = subprocess.run([sys.executable, "-m", "dreamcache_core.training.dataset", "--images", str(tmp_path / "nowhere"),
                            "--out", str(tmp_path / "out")], cwd=os.path.dirname(TESTS), capture_output=True,
                           text=True, timeout=240)
    assert shell.returncode == 2 and "Traceback" not in shell.stderr and "is not a folder" in shell.stderr


# ---------------------------------------------------------------- manifests whose paths leave their folder

def test_validate_warns_about_relative_paths_leaving_the_dataset_folder_and_keeps_absolute_ones(tmp_path, capsys):
    from comfyui_dreamcache.dreamcache_core.training.dataset import main
    from comfyui_dreamcache.dreamcache_core.io.image_files import save_png
    from comfyui_dreamcache.dreamcache_core.training.training_manifest import read_manifest

    image = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0))
    outside, data = tmp_path / "elsewhere", tmp_path / "data"
    save_png(image, str(outside / "a.png"), quantize="round")
    save_png(image, str(data / "inside.png"), quantize="round")
    rows = [{"target": "inside.png", "reference": "inside.png", "caption": "kept quietly"},
            {"target": str(outside / "a.png"), "reference": "inside.png", "caption": "absolute: allowed"},
            {"target": "inside.png", "reference": "../elsewhere/a.png", "caption": "escapes"},
            {"target": "sub/../inside.png", "reference": "./inside.png", "caption": "stays inside"}]
    manifest_path = data / "manifest.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = read_manifest(str(manifest_path))
    assert len(manifest.rows) == 4 and not manifest.skipped
    assert len(manifest.warnings) == 1
    assert manifest.warnings[0].startswith("line 3: reference '../elsewhere/a.png' leaves the manifest's folder")
    assert main(["--validate", str(manifest_path)]) == 0
    out = capsys.readouterr().out
    assert "4 rows kept, 0 skipped" in out and out.count("  warning line 3: reference") == 1
