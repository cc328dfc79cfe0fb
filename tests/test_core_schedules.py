"""The artist controls in plain torch: step schedules, layer presets, frame weights, the negative reference's
second injection, and Combine's modes. The patch callables are driven with synthetic extra_options, as
ComfyUI's transformer block calls them."""
import math

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.method.cache import (average_caches, combine_caches, combine_caches_by_mode)
from comfyui_dreamcache.dreamcache_core.method.controls import (LAYER_PRESETS, layer_groups, layer_preset_weights,
                                                                layer_strengths)
from comfyui_dreamcache.dreamcache_core.method.patch import DreamCacheInjection
from comfyui_dreamcache.dreamcache_core.method.schedules import (STEP_SCHEDULES, StepSchedule, parse_frame_weights,
                                                                 schedule_factor)
from core_fixtures import TINY_SPECS, random_tensor, sd15_specs
from test_core_controls import ADAPTER, SPEC, duplicate, make_cache, run


def discrete_percent_to_sigma(percent):
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma for SD1.5's scaled-linear betas."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    sigmas = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)) ** 0.5
    t = (1.0 - percent) * 999.0
    low = int(math.floor(t))
    high = min(low + 1, 999)
    w = t - low
    return float(torch.exp((1 - w) * sigmas[low].log() + w * sigmas[high].log()))


EXPECTED = {"linear": lambda u: 1.0, "ease in": lambda u: 1.0 - u, "ease out": lambda u: u,
            "ease in-out": lambda u: 1.0 - abs(2 * u - 1), "reverse in-out": lambda u: abs(2 * u - 1)}


@pytest.mark.parametrize("schedule", STEP_SCHEDULES)
def test_each_step_schedule_reads_sigmas_back_as_sampling_percents(schedule):
    start, end = 0.2, 0.8
    plan = StepSchedule(schedule, start, end, discrete_percent_to_sigma)
    percents = torch.tensor([0.0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.999])
    sigmas = torch.tensor([discrete_percent_to_sigma(max(float(p), 1e-4)) for p in percents])
    torch.testing.assert_close(plan.percent_of(sigmas).float(), percents.clamp_min(1e-4), atol=2e-3, rtol=0)
    for p, factor in zip(percents.tolist(), plan.factors(sigmas).tolist()):
        u = min(max((p - start) / (end - start), 0.0), 1.0)
        assert factor == pytest.approx(EXPECTED[schedule](u), abs=5e-3), (schedule, p)


def test_schedule_names_are_checked():
    with pytest.raises(ValueError, match="weight_schedule must be one of"):
        schedule_factor("sideways", 0.5)
    with pytest.raises(ValueError, match="weight_schedule must be one of"):
        StepSchedule("sideways", 0, 1, discrete_percent_to_sigma)


def test_layer_presets_name_the_layers_they_personalise():
    specs = sd15_specs()
    assert layer_groups(specs) == {"middle_block.1": "middle", "output_blocks.4.1": "coarse",
                                   "output_blocks.6.1": "coarse", "output_blocks.8.1": "fine",
                                   "output_blocks.10.1": "fine"}
    on = {preset: sorted(k for k, w in layer_preset_weights(preset, specs).items() if w == 1.0)
          for preset in LAYER_PRESETS}
    assert on == {"all layers": sorted(s.key for s in specs),
                  "shape (middle)": ["middle_block.1"],
                  "appearance (decoder)": ["output_blocks.10.1", "output_blocks.4.1", "output_blocks.6.1",
                                           "output_blocks.8.1"],
                  "composition (middle + coarse decoder)": ["middle_block.1", "output_blocks.4.1",
                                                            "output_blocks.6.1"],
                  "detail (fine decoder)": ["output_blocks.10.1", "output_blocks.8.1"]}
    # the preset multiplies the group weights; per-layer weights still override it
    strengths = layer_strengths(specs, 0.5, 2.0, "output.10=0.25", "appearance (decoder)")
    assert strengths == {"middle_block.1": 0.0, "output_blocks.4.1": 2.0, "output_blocks.6.1": 2.0,
                         "output_blocks.8.1": 2.0, "output_blocks.10.1": 0.25}
    assert layer_strengths(specs, 0.5, 2.0, "") == layer_strengths(specs, 0.5, 2.0, "", "all layers")
    with pytest.raises(ValueError, match="layer_preset must be one of"):
        layer_preset_weights("everything", specs)


@pytest.mark.parametrize("schedule", STEP_SCHEDULES)
def test_each_preset_and_schedule_reach_the_patch_at_each_step(schedule):
    """The patch blends a1 -> adapter(n, a1) by strength x preset x schedule(step): checked per layer per step
    against the unscheduled full-strength output."""
    cache = make_cache()
    preset = "shape (middle)"
    strengths = {k: v for k, v in layer_strengths(TINY_SPECS, preset=preset).items() if v != 1.0}
    plan = StepSchedule(schedule, 0.0, 1.0, discrete_percent_to_sigma)
    scheduled = DreamCacheInjection(ADAPTER, cache, 0.8, chunks=None, layer_strengths=strengths, step_schedule=plan)
    full = DreamCacheInjection(ADAPTER, cache, 1.0, chunks=None)
    for step, percent in enumerate([0.0001, 0.25, 0.5, 0.75, 0.9999]):
        sigma = discrete_percent_to_sigma(percent)
        for block in (("middle", 0), ("output", 4)):
            a1, out, n = run(scheduled, block=block, sigma=sigma, seed=step)
            _, target, _ = run(full, block=block, sigma=sigma, seed=step)
            weight = 0.8 * (1.0 if block[0] == "middle" else 0.0) * EXPECTED[schedule](percent)
            if block[0] != "middle":  # not in the preset: the block is untouched, bit for bit
                assert out is a1 or torch.equal(out, a1), (schedule, step, block)
            else:
                change, full_change = out - a1, target - a1
                effective = float((change * full_change).sum() / (full_change * full_change).sum())
                assert effective == pytest.approx(weight, abs=2e-3), (schedule, step)
                torch.testing.assert_close(change, effective * full_change, atol=1e-4, rtol=0)  # one factor per row


def test_frame_weights_parse_lists_and_keyframes():
    assert parse_frame_weights("") is None
    assert parse_frame_weights("1, 0.5; 0").for_frames(5) == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert parse_frame_weights("0=1, 4=0").for_frames(6) == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert parse_frame_weights("2:0.5, 4:1").for_frames(6) == [0.5, 0.5, 0.5, 0.75, 1.0, 1.0]
    for text, message in (("1, x", "is not a number"), ("0=1, 2", "mix plain weights"), ("a=1", "not frame=weight"),
                          ("0=1, 0=2", "two keyframes"), ("-1", "from 0 to"), ("nan", "from 0 to"),
                          ("1e9", "from 0 to")):
        with pytest.raises(ValueError, match=message):
            parse_frame_weights(text)


def test_each_frame_weight_reaches_only_its_frame():
    cache = make_cache()
    weights = parse_frame_weights("0, 1, 0.5")
    framed = DreamCacheInjection(ADAPTER, cache, 1.0, chunks=None, frame_weights=weights)
    full = DreamCacheInjection(ADAPTER, cache, 1.0, chunks=None)
    a1, out, _ = run(framed, images=3, cond_or_uncond=(1, 0))  # rows: uncond 0..2, cond 3..5
    _, target, _ = run(full, images=3, cond_or_uncond=(1, 0))
    for chunk in (0, 3):
        assert torch.equal(out[chunk + 0], a1[chunk + 0])                          # weight 0: bit for bit
        torch.testing.assert_close(out[chunk + 1], target[chunk + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[chunk + 2], a1[chunk + 2] + 0.5 * (target[chunk + 2] - a1[chunk + 2]),
                                   atol=1e-5, rtol=0)
    # all ones is the unscheduled path, bit for bit
    ones = DreamCacheInjection(ADAPTER, cache, 1.0, chunks=None, frame_weights=parse_frame_weights("1"))
    _, out_ones, _ = run(ones, images=3)
    torch.testing.assert_close(out_ones, target, atol=1e-6, rtol=0)


def test_frame_weights_with_a_region_multiply_its_token_weights():
    cache = make_cache()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    framed = DreamCacheInjection(ADAPTER, cache, 1.0, chunks=None, region_mask=mask,
                                 frame_weights=parse_frame_weights("1, 0"))
    a1, out, _ = run(framed, images=2, cond_or_uncond=(0,))
    assert torch.equal(out[1], a1[1])                                             # frame 1: weight 0
    left = torch.arange(16).view(4, 4)[:, :2].flatten()
    right = torch.arange(16).view(4, 4)[:, 2:].flatten()
    assert torch.equal(out[0, right], a1[0, right]) and not torch.equal(out[0, left], a1[0, left])


def test_a_negative_reference_is_a_second_injection_on_its_own_rows():
    """Reference on chunk 0, negative reference on chunk 1: each chunk's rows equal that cache's own injection."""
    positive, negative = make_cache(seed=0), make_cache(seed=5)
    both = [DreamCacheInjection(ADAPTER, positive, chunks=(0,)), DreamCacheInjection(ADAPTER, negative, chunks=(1,))]
    batch, tokens = 4, 16
    n = random_tensor(batch, tokens, SPEC.dim, seed=1)
    a1 = random_tensor(batch, tokens, SPEC.dim, seed=2)
    extra = {"block": ("output", 4), "block_index": 0, "cond_or_uncond": [1, 0], "sigmas": torch.full((batch,), 5.0)}
    with torch.no_grad():
        for injection in both:                      # ComfyUI runs every attn1_patch, then every output patch
            injection.attn1_patch(n, n, n, extra)
        out = a1
        for injection in both:
            out = injection.attn1_output_patch(out, extra)
    _, alone_negative, _ = run(DreamCacheInjection(ADAPTER, negative, chunks=(1,)), n=n, a1=a1)
    _, alone_positive, _ = run(DreamCacheInjection(ADAPTER, positive, chunks=(0,)), n=n, a1=a1)
    assert torch.equal(out[:2], alone_negative[:2]) and torch.equal(out[2:], alone_positive[2:])
    assert not torch.equal(out[:2], a1[:2]) and not torch.equal(out[2:], a1[2:])


def test_combine_modes_union_average_subtract():
    a, b, c = make_cache(seed=0), make_cache(seed=1), make_cache(seed=2)
    union, none = combine_caches_by_mode([a, b, c], [1, 2, 1], "union")
    assert none is None and union.num_references == 3 and union.reference_weights == [1.0, 2.0, 1.0]
    expected = combine_caches([a, b, c], [1, 2, 1])
    assert all(torch.equal(union.features[k], expected.features[k]) for k in a.keys)

    mean, none = combine_caches_by_mode([a, b, c], [1, 2, 1], "average")
    assert none is None and mean.num_references == 1
    for key in a.keys:
        manual = (a.features[key].float() * 0.25 + b.features[key].float() * 0.5 + c.features[key].float() * 0.25)
        torch.testing.assert_close(mean.features[key].float(), manual.half().float())
    # a reference averaged with itself is itself
    same = average_caches([a, a], [1, 3])
    assert all(torch.equal(same.features[k], a.features[k]) for k in a.keys)

    reference, negative = combine_caches_by_mode([a, b, c], [1, 2, 1], "subtract")
    assert reference is a and negative.num_references == 2 and negative.reference_weights == [2.0, 1.0]

    with pytest.raises(ValueError, match="same number of references"):
        average_caches([a, duplicate(b)])
    with pytest.raises(ValueError, match="same size"):
        average_caches([a, make_cache(size=6)])
    with pytest.raises(ValueError, match="needs a cache to subtract"):
        combine_caches_by_mode([a], [1], "subtract")
    with pytest.raises(ValueError, match="mode must be one of"):
        combine_caches_by_mode([a, b], [1, 1], "multiply")


def test_average_keeps_a_token_that_is_subject_in_any_cache():
    left, right = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    left[..., :4] = 1
    right[..., 4:] = 1
    mean = average_caches([make_cache(masks=left), make_cache(seed=1, masks=right)])
    assert all(bool(mask.all()) for mask in mean.token_masks.values())
