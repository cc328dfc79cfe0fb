"""The artist controls through ComfyUI's real sampling code on a tiny SD1.5-shaped U-Net, every node run as
ComfyUI's executor runs it (validated inputs, inference mode): weight schedules and layer presets per step,
per-frame weights, the negative reference (Apply and Guider), Combine with more caches and its modes, and
Encode in passes with a progress bar.

Skipped (with the reason) when COMFYUI_PATH is unset.
"""
import pytest
import torch

from run_as_comfyui import run_node
from test_comfy_controls import apply, assert_close, guider_node, noise_for, prediction_at, run_guider
from tiny_models import ksample, text_conditioning, tiny_setup_with_caches

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

STEPS = 5


@pytest.fixture(scope="module")
def sd15():
    return tiny_setup_with_caches(3)


def output_patches(model):
    from comfyui_dreamcache.dreamcache_core.method.patch import DreamCacheOutputPatch
    patches = model.model_options["transformer_options"]["patches"]["attn1_output_patch"]
    return [p for p in patches if isinstance(p, DreamCacheOutputPatch)]


EXPECTED = {"linear": lambda u: 1.0, "ease in": lambda u: 1.0 - u, "ease out": lambda u: u,
            "ease in-out": lambda u: 1.0 - abs(2 * u - 1), "reverse in-out": lambda u: abs(2 * u - 1)}
PRESET_LAYERS = {"all layers": {"middle", "coarse", "fine"}, "shape (middle)": {"middle"},
                 "appearance (decoder)": {"coarse", "fine"},
                 "composition (middle + coarse decoder)": {"middle", "coarse"}, "detail (fine decoder)": {"fine"}}


@pytest.mark.parametrize("schedule, preset", [("ease in", "shape (middle)"), ("ease out", "appearance (decoder)"),
                                              ("ease in-out", "composition (middle + coarse decoder)"),
                                              ("reverse in-out", "detail (fine decoder)"), ("linear", "all layers")])
def test_each_schedule_and_preset_give_their_strength_at_each_step(sd15, schedule, preset):
    """KSampler (normal scheduler: step k of N at sampling percent k / (N - 1)): the strength each memory layer
    gets on each step is strength x preset x schedule(progress), read off the patch during real sampling."""
    from comfyui_dreamcache.dreamcache_core.method.controls import layer_groups

    start, end, strength = 0.25, 0.75, 0.8
    from comfyui_dreamcache.nodes.apply import DreamCacheApply
    (patched,) = run_node(DreamCacheApply, sd15["model"], sd15["trained"], sd15["caches"][0], strength, start, end,
                          "positive only", layer_preset=preset, weight_schedule=schedule)
    (patch,) = output_patches(patched)
    injection = patch.injection
    seen = []
    row_scales = injection.row_scales

    def recording(batch, extra_options):
        scales = row_scales(batch, extra_options)
        seen.append((float(extra_options["sigmas"].reshape(-1)[0]), extra_options["block"],
                     None if scales is None else float(scales[0])))
        return scales
    injection.row_scales = recording
    ksample(patched, sd15["positive"], sd15["negative"], torch.zeros(1, 4, 8, 8), seed=3, steps=STEPS)

    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(sd15["model"].get_model_object("model_sampling"), "normal", STEPS)
    groups = layer_groups(sd15["specs"])
    blocks = {spec.block: spec.key for spec in sd15["specs"]}
    visited = set()
    for step in range(STEPS):
        percent = step / (STEPS - 1)
        in_window = start <= percent + 1e-6 and percent - 1e-6 <= end
        calls = [(block, scale) for sigma, block, scale in seen if abs(sigma - float(sigmas[step])) < 1e-4 * sigma]
        if not in_window:
            assert not calls, (step, calls)  # outside start..end the patch returns before any schedule
            continue
        u = min(max((percent - start) / (end - start), 0.0), 1.0)
        for block, key in blocks.items():
            layer = injection.layer_strengths.get(key, 1.0)
            assert layer == (1.0 if groups[key] in PRESET_LAYERS[preset] else 0.0)
            scale = [s for b, s in calls if (b[0], int(b[1])) == block]
            if layer == 0.0:
                assert not scale, (preset, key)  # a layer the preset leaves out is never touched
                continue
            factor = 1.0 if scale[0] is None else scale[0]
            assert strength * layer * factor == pytest.approx(strength * EXPECTED[schedule](u), abs=3e-3), (step, key)
            visited.add(key)
    assert visited == {key for key in blocks.values() if groups[key] in PRESET_LAYERS[preset]}


def test_shape_preset_with_middle_weight_zero_is_the_plain_model_bit_for_bit(sd15):
    latent = torch.zeros(1, 4, 8, 8)
    plain = ksample(sd15["model"], sd15["positive"], sd15["negative"], latent, seed=4)
    patched = apply(sd15["model"], sd15["trained"], sd15["caches"][0], layer_preset="shape (middle)",
                    middle_weight=0.0)
    assert torch.equal(ksample(patched, sd15["positive"], sd15["negative"], latent, seed=4), plain)
    full = apply(sd15["model"], sd15["trained"], sd15["caches"][0])
    assert not torch.equal(ksample(full, sd15["positive"], sd15["negative"], latent, seed=4), plain)


def test_each_frame_weight_reaches_only_its_frame(sd15):
    """A batch of three frames with weights 0, 1, 0: frames 0 and 2 are the plain model's bit for bit, frame 1 is
    the fully personalised frame."""
    latent = torch.zeros(3, 4, 8, 8)
    plain = ksample(sd15["model"], sd15["positive"], sd15["negative"], latent, seed=6)
    full = ksample(apply(sd15["model"], sd15["trained"], sd15["caches"][0]), sd15["positive"], sd15["negative"],
                   latent, seed=6)
    framed = ksample(apply(sd15["model"], sd15["trained"], sd15["caches"][0], frame_weights="0, 1, 0"),
                     sd15["positive"], sd15["negative"], latent, seed=6)
    assert torch.equal(framed[0], plain[0]) and torch.equal(framed[2], plain[2])
    assert not torch.equal(framed[1], plain[1])
    assert_close(framed[1], full[1], rel=1e-4)
    # keyframes: frame 0 at 0, the rest interpolated up to 1
    keyed = ksample(apply(sd15["model"], sd15["trained"], sd15["caches"][0], frame_weights="0=0, 2=1"),
                    sd15["positive"], sd15["negative"], latent, seed=6)
    assert torch.equal(keyed[0], plain[0]) and not torch.equal(keyed[1], plain[1])
    assert_close(keyed[2], full[2], rel=1e-4)


def test_apply_negative_reference_takes_the_negative_prompts_rows(sd15):
    """The same cache as negative reference = the reference injected into both batches (apply_to 'positive and
    negative'), up to the rounding of the adapter run on half the rows at a time."""
    latent = torch.zeros(1, 4, 8, 8)
    cache = sd15["caches"][0]
    both = ksample(apply(sd15["model"], sd15["trained"], cache, apply_to="positive and negative"),
                   sd15["positive"], sd15["negative"], latent, seed=8)
    negative_same = apply(sd15["model"], sd15["trained"], cache, negative_cache=cache)
    assert len(output_patches(negative_same)) == 2
    assert_close(ksample(negative_same, sd15["positive"], sd15["negative"], latent, seed=8), both, rel=1e-4)
    positive_only = ksample(apply(sd15["model"], sd15["trained"], cache), sd15["positive"], sd15["negative"],
                            latent, seed=8)
    other = ksample(apply(sd15["model"], sd15["trained"], cache, negative_cache=sd15["caches"][1]),
                    sd15["positive"], sd15["negative"], latent, seed=8)
    assert not torch.equal(other, positive_only) and not torch.equal(other, both)
    # one adapter handed to ComfyUI's memory manager, sized with both memories
    import comfy.model_management
    first, second = (p.models() for p in output_patches(negative_same))
    assert len(first) == 1 and second == []
    injections = [p.injection for p in output_patches(negative_same)]
    assert injections[0].adapter is injections[1].adapter
    dtype = sd15["model"].model_dtype()
    assert first[0].size == (comfy.model_management.module_size(injections[0].adapter)
                             + sum(i.device_memory_bytes(dtype) for i in injections))


def test_guider_without_negative_reference_is_todays_guider_and_with_one_steers_e00(sd15):
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import combined_guider
    from comfyui_dreamcache.dreamcache_core.method.guidance import REFERENCE_CHUNKS
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injection

    noise = noise_for()
    cache = sd15["caches"][0]
    args = (sd15["model"], sd15["trained"], cache, sd15["positive"], sd15["negative"], 7.5, 5.0)
    todays = combined_guider(sd15["model"], build_injection(sd15["model"], sd15["trained"], cache,
                                                            chunks=REFERENCE_CHUNKS, memory_managed=True),
                             sd15["positive"], sd15["negative"], 7.5, 5.0)
    # no negative reference ("no reference" in the unconditional branch): today's guider, bit for bit
    assert torch.equal(run_guider(guider_node(*args), noise), run_guider(todays, noise))
    # the reference itself as the negative: e(N,0) = e(I,0), so image_cfg drops out (= image_cfg 1)
    same = prediction_at(guider_node(*args, negative_cache=cache), noise)
    image_cfg_one = prediction_at(guider_node(*args[:-1], 1.0), noise)
    assert_close(same, image_cfg_one, rel=1e-4)
    # another subject as the negative changes the result
    other = prediction_at(guider_node(*args, negative_cache=sd15["caches"][1]), noise)
    assert not torch.equal(other, prediction_at(guider_node(*args), noise))


def test_guider_with_every_frame_weight_zero_is_plain_cfg_at_text_cfg(sd15):
    """Frame weight 0 leaves every row unpersonalised: e(I,.) = e(0,.), so combined guidance is the stock CFG
    at text_cfg (up to the rounding of a three-chunk batch against a two-chunk one)."""
    from test_comfy_controls import plain_guider

    noise = noise_for(batch=2)
    args = (sd15["model"], sd15["trained"], sd15["caches"][0], sd15["positive"], sd15["negative"], 6.0, 3.0)
    off = prediction_at(guider_node(*args, frame_weights="0"), noise)
    assert_close(off, prediction_at(plain_guider(sd15["model"], sd15["positive"], sd15["negative"], 6.0), noise),
                 rel=1e-4)
    half = prediction_at(guider_node(*args, frame_weights="0, 1"), noise)
    full = prediction_at(guider_node(*args), noise)
    assert_close(half[0], off[0], rel=1e-4)
    assert_close(half[1], full[1], rel=1e-4)
    assert not torch.equal(half[1], off[1])


def test_combine_more_caches_and_its_modes(sd15):
    from comfyui_dreamcache.dreamcache_core.method.cache import average_caches, combine_caches
    from comfyui_dreamcache.nodes.combine import DreamCacheCombine

    a, b, c = sd15["caches"]
    union, negative = run_node(DreamCacheCombine, a, b, 1.0, 2.0, cache_3=c, weight_3=0.5)
    assert negative is None and union.num_references == 3 and union.reference_weights == [1.0, 2.0, 0.5]
    expected = combine_caches([a, b, c], [1.0, 2.0, 0.5])
    assert all(torch.equal(union.features[k], expected.features[k]) for k in a.keys)
    mean, _ = run_node(DreamCacheCombine, a, b, 1.0, 1.0, cache_3=c, mode="average")
    assert all(torch.equal(mean.features[k], average_caches([a, b, c]).features[k]) for k in a.keys)
    reference, negative = run_node(DreamCacheCombine, a, b, 1.0, 1.0, cache_3=c, weight_3=3.0, mode="subtract")
    assert reference is a and negative.num_references == 2 and negative.reference_weights == [1.0, 3.0]
    # subtract's negative output drives the guider's negative reference
    noise = noise_for()
    args = (sd15["model"], sd15["trained"], reference, sd15["positive"], sd15["negative"], 7.5, 5.0)
    assert not torch.equal(prediction_at(guider_node(*args, negative_cache=negative), noise),
                           prediction_at(guider_node(*args), noise))
    with pytest.raises(ValueError, match="not one of the choices"):
        run_node(DreamCacheCombine, a, b, 1.0, 1.0, mode="multiply")


def test_encode_in_passes_with_a_progress_bar(sd15):
    import comfy.utils
    from comfyui_dreamcache.nodes.encode import DreamCacheEncode

    references = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    (whole,) = run_node(DreamCacheEncode, sd15["model"], {"samples": references}, text_conditioning(0), seed=2)
    (wide,) = run_node(DreamCacheEncode, sd15["model"], {"samples": references}, text_conditioning(0), seed=2,
                       batch_size=5)
    assert all(torch.equal(whole.features[k], wide.features[k]) for k in whole.keys)  # one pass: bit for bit
    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        (split,) = run_node(DreamCacheEncode, sd15["model"], {"samples": references}, text_conditioning(0), seed=2,
                            batch_size=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert updates[:3] == [(2, 5), (4, 5), (5, 5)]
    assert split.num_references == 5 and split.metadata == whole.metadata
    for key in whole.keys:  # the noise of each reference is the one-pass noise; only kernel rounding differs
        torch.testing.assert_close(split.features[key].float(), whole.features[key].float(), atol=5e-3, rtol=1e-3)
