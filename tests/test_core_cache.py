"""The reference cache: its file (fp16 features, token masks, metadata), its memory tokens, token masks from a
subject mask, and the check that a cache fits the model it is applied to."""
import pytest
import torch

from comfyui_dreamcache.dreamcache_core.io.cache_files import CacheFileError, load_cache, save_cache
from comfyui_dreamcache.dreamcache_core.method.cache import check_cache_fits, token_masks_from_mask
from comfyui_dreamcache.dreamcache_core.method.layers import MemoryLayerSpec
from core_fixtures import TINY_SIGNATURE, TINY_SPECS, tiny_cache


def test_cache_round_trip_is_fp16_and_keeps_masks_and_metadata(tmp_path):
    cache = tiny_cache(num_refs=2, with_mask=True)
    path = str(tmp_path / "ref.safetensors")
    save_cache(cache, path)
    loaded = load_cache(path)
    assert loaded.keys == cache.keys and loaded.metadata == cache.metadata
    for key in cache.keys:
        assert loaded.features[key].dtype == torch.float16
        assert torch.equal(loaded.features[key], cache.features[key])
        assert torch.equal(loaded.token_masks[key], cache.token_masks[key])
    assert cache.nbytes() == sum(2 * s.channels * 16 * 2 for s in TINY_SPECS)


def test_cache_memory_tokens_union_of_subject_tokens_and_memoised():
    cache = tiny_cache(num_refs=2, with_mask=True)
    key = TINY_SPECS[0].key
    tokens = cache.memory_tokens(key, "cpu", torch.float32)
    # the mask covers the centre 2x2 of each 4x4 map: 4 subject tokens per reference, 2 references
    assert tokens.shape == (1, 8, TINY_SPECS[0].channels)
    centre = cache.features[key][:, :, 1:3, 1:3].float().flatten(2).transpose(1, 2).reshape(-1, TINY_SPECS[0].channels)
    assert torch.equal(tokens[0], centre)
    assert cache.memory_tokens(key, "cpu", torch.float32) is tokens


def test_token_masks_keep_a_small_subject_and_reject_an_empty_mask():
    mask = torch.zeros(1, 64, 64)
    mask[0, 30:33, 30:33] = 1  # far below half a token at 4x4
    out = token_masks_from_mask(mask, {"a": (1, 4, 4), "b": (1, 64, 64)})
    assert out["a"].sum() >= 1 and out["b"].sum() == 9
    with pytest.raises(ValueError, match="empty"):
        token_masks_from_mask(torch.zeros(1, 8, 8), {"a": (1, 4, 4)})
    with pytest.raises(ValueError, match="one per reference"):
        token_masks_from_mask(torch.ones(2, 8, 8), {"a": (3, 4, 4)})


def test_cache_check_rejects_another_model():
    cache = tiny_cache()
    check_cache_fits(cache, TINY_SPECS, TINY_SIGNATURE)
    wider = [MemoryLayerSpec(s.key, s.block, s.channels * 2, s.dim * 2, s.heads, s.dim_head * 2) for s in TINY_SPECS]
    with pytest.raises(ValueError, match="encoded on another model"):
        check_cache_fits(cache, wider)
    with pytest.raises(ValueError, match="encoded on another model"):
        check_cache_fits(cache, TINY_SPECS[:2])
    with pytest.raises(ValueError, match="text width"):
        check_cache_fits(cache, TINY_SPECS, dict(TINY_SIGNATURE, context_dim=99))


def test_a_safetensors_file_of_another_kind_is_refused_as_a_cache(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(CacheFileError, match="not a DreamCache cache"):
        load_cache(path)
