"""Hostile input that used to raise raw Python errors or hang, in plain torch: frame weights of only separators
or huge frame numbers, deeply nested JSON metadata, an adapter's text width that is not a whole number, a cache
prefix too long for the file system, a layer preset that selects no memory layer, and Reference Noise's blur on a
large photo (bounded time, close to the exact blur)."""
import json
import math
import re
import time

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.io.adapter_io import AdapterFileError, adapter_state_dict, load_adapter
from comfyui_dreamcache.dreamcache_core.masking.reference_noise import (_exact_blur, blur_reduction, blurred,
                                                                         noised_reference)
from comfyui_dreamcache.dreamcache_core.method.adapter import build_adapter
from comfyui_dreamcache.dreamcache_core.method.base_family import base_family
from comfyui_dreamcache.dreamcache_core.io.cache_files import CacheFileError, load_cache
from comfyui_dreamcache.dreamcache_core.method.cache import check_cache_fits
from comfyui_dreamcache.dreamcache_core.method.controls import layer_strengths
from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec
from comfyui_dreamcache.dreamcache_core.method.schedules import parse_frame_weights
from core_fixtures import TINY_SIGNATURE, TINY_SPECS
from core_fixtures import tiny_cache


@pytest.mark.parametrize("text, match", [
    (",,,", r"Frame weights ',,,' hold no weight, only separators.*leave the field empty"),
    (" ; , \n", r"hold no weight, only separators"),
    ("1" * 5000 + "=1", r"names frame 1{40}\.\.\. \(4960 more characters\), beyond the last frame.*0 to 1000000"),
    ("0=1, " + "9" * 5000 + "=0", r"beyond the last frame any batch has"),
])
def test_frame_weights_without_weights_or_with_absurd_frames_say_what_to_write(text, match):
    with pytest.raises(ValueError, match=match):
        parse_frame_weights(text)


def test_frame_weights_with_leading_zeros_and_the_largest_frame_still_parse():
    assert parse_frame_weights("0007=0.5, 1000000=1").keyframes == [(7, 0.5), (1000000, 1.0)]


def nested(depth):
    return "[" * depth + "]" * depth


def _cache_with_metadata(tmp_path, metadata):
    from safetensors.torch import save_file

    cache = tiny_cache(num_refs=1)
    path = str(tmp_path / "cache.safetensors")
    save_file({f"features.{k}": v for k, v in cache.features.items()}, path,
              metadata={"dreamcache_format": "cache", "dreamcache_version": "1", "metadata": metadata})
    return path


def _adapter_with(tmp_path, **changes):
    from safetensors.torch import save_file

    metadata = {"dreamcache_format": "adapter", "dreamcache_version": "1",
                "layers": json.dumps([s.to_json() for s in TINY_SPECS]), "signature": json.dumps(TINY_SIGNATURE)}
    metadata.update(changes)
    path = str(tmp_path / "adapter.safetensors")
    save_file(adapter_state_dict(build_adapter(TINY_SPECS, TINY_SIGNATURE)), path, metadata=metadata)
    return path


@pytest.mark.parametrize("depth", [33, 5000, 100000])
def test_deeply_nested_json_metadata_is_refused_naming_the_field(tmp_path, depth):
    with pytest.raises(CacheFileError, match=r"cache\.safetensors: the 'metadata' field nests lists or objects more "
                                             r"than 32 levels deep.*Save the cache again"):
        load_cache(_cache_with_metadata(tmp_path, '{"a": ' + nested(depth) + "}"))
    with pytest.raises(AdapterFileError, match=r"the 'signature' metadata field nests .* save or convert"):
        load_adapter(_adapter_with(tmp_path, signature='{"x": ' + nested(depth) + "}"))
    with pytest.raises(AdapterFileError, match=r"the 'layers' metadata field nests"):
        load_adapter(_adapter_with(tmp_path, layers=nested(depth)))


def test_brackets_inside_json_strings_do_not_count_as_nesting(tmp_path):
    cache = load_cache(_cache_with_metadata(tmp_path, json.dumps({"note": "[" * 100 + "{" * 100})))
    assert cache.metadata["note"] == "[" * 100 + "{" * 100


@pytest.mark.parametrize("width, shown", [("768", "'768', not a number"), ([768], r"'\[768\]', not a number"),
                                          (float("inf"), "inf, not a whole number"),
                                          (768.5, "768.5, not a whole number"), (True, "'True', not a number")])
def test_an_adapter_whose_text_width_is_not_a_whole_number_is_refused_on_load(tmp_path, width, shown):
    signature = json.dumps(dict(TINY_SIGNATURE, context_dim=width))  # json writes inf as Infinity
    with pytest.raises(AdapterFileError, match=r"adapter\.safetensors: the 'signature' metadata is damaged: its text "
                                               r"width \(context_dim\) is " + shown):
        load_adapter(_adapter_with(tmp_path, signature=signature))
    with pytest.raises(ValueError, match="text width .*" + shown):
        base_family({"context_dim": width})


def test_the_negative_cache_from_another_model_is_named_as_such():
    cache = tiny_cache(num_refs=1)
    other = [MemoryLayerSpec.from_json(dict(s.to_json(), channels=s.channels * 2)) for s in TINY_SPECS]
    with pytest.raises(ValueError, match=r"^The negative_cache \(the negative reference\) was encoded on another "
                                         r"model.*Encode the negative reference"):
        check_cache_fits(cache, other, role="negative_cache")
    with pytest.raises(ValueError, match=r"^This DreamCache was encoded on another model"):
        check_cache_fits(cache, other)


def spec(key, block):
    return MemoryLayerSpec(key=key, block=block, dim=32, channels=32, heads=2, dim_head=16)


NO_MIDDLE = [spec("output_blocks.4.1", ("output", 4)), spec("output_blocks.7.1", ("output", 7))]
ONE_DECODER = [spec("middle_block.1", ("middle", 0)), spec("output_blocks.4.1", ("output", 4))]


@pytest.mark.parametrize("specs, preset, has", [
    (NO_MIDDLE, "shape (middle)", "no middle transformer and 2 decoder memory layer"),
    (ONE_DECODER, "detail (fine decoder)", r"a middle memory layer and 1 decoder memory layer\(s\) \(1 coarse, 0 fine"),
])
def test_a_preset_that_selects_no_memory_layer_says_so(specs, preset, has):
    with pytest.raises(ValueError, match=rf"layer_preset '{re.escape(preset)}' selects no memory layer of this "
                                         rf"model, which has {has}.*Pick a preset"):
        layer_strengths(specs, preset=preset)
    # a layer named in layer_weights selects it: no error, that layer only
    chosen = layer_strengths(specs, overrides=f"{specs[-1].key}=1", preset=preset)
    assert chosen[specs[-1].key] == 1.0 and sum(chosen.values()) == 1.0
    # explicit zero weights stay what they were: the plain model, by the artist's choice
    assert set(layer_strengths(specs, 0.0, 0.0).values()) == {0.0}



def photo(side, seed=0):
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = (((x - side / 2) ** 2 + (y - side / 2) ** 2) < (side / 3) ** 2).float()
    noise = torch.rand(side, side, 3, generator=torch.Generator().manual_seed(seed))
    return (disc[..., None] * torch.tensor([0.9, 0.2, 0.1]) + 0.05 * noise).clamp(0, 1)[None]


def test_blur_of_ordinary_references_is_the_exact_blur_bit_for_bit():
    image = photo(512)
    assert blur_reduction(0.05 * 512, 512, 512) == 1
    exact = _exact_blur(image[0].permute(2, 0, 1).unsqueeze(1), 0.05 * 512)[:, 0].permute(1, 2, 0)[None]
    assert torch.equal(blurred(image, 0.05 * 512), exact)


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_blur_of_a_large_photo_is_reduced_and_close_to_the_exact_blur(strength):
    image = photo(1024)
    sigma = 0.05 * 1024 * strength
    assert blur_reduction(sigma, 1024, 1024) > 1
    fast = blurred(image, sigma)
    exact = _exact_blur(image[0].permute(2, 0, 1).unsqueeze(1), sigma)[:, 0].permute(1, 2, 0)[None]
    change = float((exact - image).abs().max())
    assert float((fast - exact).abs().max()) < 1 / 255 < change / 50


def test_blur_of_a_4096_px_photo_takes_seconds_with_a_report_per_image():
    image = torch.rand(2, 4096, 4096, 3, generator=torch.Generator().manual_seed(0))
    reports = []
    started = time.monotonic()
    out = noised_reference(image, "blur", 1.0, seed=0, on_image=lambda done, total: reports.append((done, total)))
    elapsed = time.monotonic() - started
    assert reports == [(1, 2), (2, 2)]
    assert out.shape == image.shape and bool(torch.isfinite(out).all())
    assert float(out.std()) < float(image.std()) / 10  # sigma 205 px flattens uniform noise
    assert elapsed < 60, f"blurring two 4096 px photos took {elapsed:.0f} s"  # the exact blur took > 120 s for one
    assert math.isclose(float(out.mean()), float(image.mean()), abs_tol=2e-3)
