"""Reference Noise in plain torch: the degraded copy of a reference that makes a negative reference (gaussian,
shuffle, fade, blur), its seed, alpha channel, mask, dtype and every error message."""
import math

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.masking.reference_noise import MODES, noised_reference

NAN, INF = float("nan"), float("inf")


def photo(batch=1, height=24, width=32, channels=3, seed=0):
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


def grey(batch=1, height=64, width=64, channels=3, value=0.5):
    return torch.full((batch, height, width, channels), value)


@pytest.mark.parametrize("mode", MODES)
def test_strength_0_is_an_exact_copy(mode):
    image = photo(batch=2, channels=4)
    out = noised_reference(image, mode, 0.0, seed=3)
    assert torch.equal(out, image)
    assert out.data_ptr() != image.data_ptr(), "strength 0 must return a copy, not the input itself"
    masked = noised_reference(image, mode, 0, seed=3, mask=torch.ones(1, 24, 32))
    assert torch.equal(masked, image)


@pytest.mark.parametrize("mode", ["gaussian", "shuffle"])
def test_same_seed_same_image_other_seed_other_image(mode):
    image = photo(batch=2)
    first = noised_reference(image, mode, 0.5, seed=7)
    assert torch.equal(first, noised_reference(image, mode, 0.5, seed=7))
    other = noised_reference(image, mode, 0.5, seed=8)
    assert not torch.equal(first, other)
    assert (first != other).float().mean() > 0.3  # not a few pixels: most of the degraded ones differ
    assert not torch.equal(first[0], first[1] - image[1] + image[0]), "every image of a batch gets its own noise"
    big = noised_reference(image, mode, 0.5, seed=0xffffffffffffffff)  # ComfyUI's largest seed
    assert big.shape == image.shape and not torch.equal(big, first)


@pytest.mark.parametrize("mode", ["fade", "blur"])
def test_modes_without_randomness_ignore_the_seed(mode):
    image = photo()
    assert torch.equal(noised_reference(image, mode, 0.4, seed=1), noised_reference(image, mode, 0.4, seed=2))


@pytest.mark.parametrize("strength", [0.02, 0.05, 0.1])
def test_gaussian_noise_has_the_strength_as_standard_deviation(strength):
    image = grey(batch=2, height=128, width=128)  # 98304 values: std known to well under 1 %
    out = noised_reference(image, "gaussian", strength, seed=11)
    difference = out - image
    assert abs(float(difference.mean())) < 0.01 * strength + 1e-4
    assert float(difference.std()) == pytest.approx(strength, rel=0.02)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_gaussian_is_clamped_to_0_1():
    out = noised_reference(grey(height=32, width=32), "gaussian", 1.0, seed=0)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0  # at std 1 about 31 % of values hit each bound
    assert 0.25 < float((out == 1.0).float().mean()) < 0.37
    assert 0.25 < float((out == 0.0).float().mean()) < 0.37


def sorted_colours(image):
    """The multiset of pixel colours (rows of C channels) in a canonical order."""
    pixels = image.reshape(-1, image.shape[-1]).double()
    key = pixels[:, 0] * 4 + pixels[:, 1] * 2 + pixels[:, 2]  # distinct for the random photos used here
    return pixels[key.argsort()]


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_shuffle_keeps_every_colour_and_moves_the_chosen_fraction(strength):
    image = photo(height=20, width=30, seed=4)  # 600 pixels, all colours distinct
    out = noised_reference(image, "shuffle", strength, seed=5)
    assert torch.equal(sorted_colours(out), sorted_colours(image))
    assert torch.equal(out.flatten().sort().values, image.flatten().sort().values)
    moved = (out != image).any(dim=-1)
    assert int(moved.sum()) == round(strength * 600)  # every chosen pixel moves, the others stay
    unmoved = ~moved
    assert torch.equal(out[unmoved], image[unmoved])


def test_shuffle_at_strength_1_moves_every_pixel_per_image():
    image = photo(batch=3, height=16, width=16, seed=9)
    out = noised_reference(image, "shuffle", 1.0, seed=1)
    for index in range(3):  # pixels trade places inside their own image only
        assert torch.equal(sorted_colours(out[index]), sorted_colours(image[index]))
        assert bool((out[index] != image[index]).any(dim=-1).all())


def test_fade_is_a_linear_blend_toward_mid_grey():
    image = photo(batch=2, seed=2)
    assert torch.equal(noised_reference(image, "fade", 1.0, seed=0), torch.full_like(image, 0.5))
    half = noised_reference(image, "fade", 0.5, seed=0)
    torch.testing.assert_close(half, 0.5 * image + 0.25, rtol=0, atol=1e-7)
    quarter = noised_reference(image, "fade", 0.25, seed=0)
    torch.testing.assert_close(quarter, 0.75 * image + 0.125, rtol=0, atol=1e-7)


@pytest.mark.parametrize("strength", [0.2, 1.0])
def test_blur_keeps_a_constant_image(strength):
    image = grey(height=40, width=50, value=0.3)
    out = noised_reference(image, "blur", strength, seed=0)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)


def test_blur_of_an_impulse_is_a_normalised_symmetric_gaussian():
    image = torch.zeros(1, 65, 81, 3)
    image[0, 32, 40, :] = 1.0
    strength = 0.6  # sigma = 0.6 * 0.05 * 65 = 1.95 px, kernel radius 6: far from the borders
    out = noised_reference(image, "blur", strength, seed=0)
    plane = out[0, :, :, 0].double()
    assert float(plane.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])
    torch.testing.assert_close(plane, plane.flip(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(plane, plane.flip(1), rtol=0, atol=1e-7)
    assert int(plane.argmax()) == 32 * 81 + 40
    sigma = strength * 0.05 * 65
    rows = torch.arange(65, dtype=torch.float64) - 32
    variance = float((plane.sum(dim=1) * rows ** 2).sum())  # the spread is the requested sigma
    assert math.sqrt(variance) == pytest.approx(sigma, rel=0.02)
    assert float(plane[32, 40 + 7]) == 0.0  # nothing beyond the kernel radius ceil(3 sigma) = 6


def test_blur_sigma_follows_the_shorter_side():
    wide = torch.zeros(1, 41, 200, 1)
    wide[0, 20, 100, 0] = 1.0
    tall = wide.transpose(1, 2).contiguous()
    out_wide = noised_reference(wide, "blur", 1.0, seed=0)[0, :, :, 0]
    out_tall = noised_reference(tall, "blur", 1.0, seed=0)[0, :, :, 0]
    torch.testing.assert_close(out_tall, out_wide.T, rtol=0, atol=1e-7)
    rows = torch.arange(41, dtype=torch.float64) - 20
    spread = math.sqrt(float((out_wide.double().sum(dim=1) * rows ** 2).sum()))
    assert spread == pytest.approx(0.05 * 41, rel=0.05)


@pytest.mark.parametrize("mode", MODES)
def test_alpha_channel_passes_through(mode):
    image = photo(batch=2, channels=4, seed=6)
    out = noised_reference(image, mode, 0.8, seed=2)
    assert torch.equal(out[..., 3], image[..., 3])
    assert not torch.equal(out[..., :3], image[..., :3])
    rgb_only = noised_reference(image[..., :3].contiguous(), mode, 0.8, seed=2)
    assert torch.equal(out[..., :3], rgb_only), "the colour channels do not depend on the alpha channel"


@pytest.mark.parametrize("mode", MODES)
def test_mask_limits_the_change(mode):
    image = photo(batch=2, height=24, width=32, seed=8)
    mask = torch.zeros(1, 24, 32)
    mask[:, 6:18, 8:24] = 1.0
    out = noised_reference(image, mode, 0.7, seed=4, mask=mask)
    outside = mask[0] == 0
    assert torch.equal(out[:, outside], image[:, outside])  # bit for bit
    full = noised_reference(image, mode, 0.7, seed=4)
    inside = ~outside
    assert not torch.equal(out[:, inside], image[:, inside])
    if mode != "shuffle":  # the mask blends the unmasked result in; shuffle draws only masked pixels instead
        assert torch.equal(out[:, inside], full[:, inside])


def test_soft_mask_blends_proportionally_and_per_image_masks_apply():
    image = photo(batch=2, seed=1)
    mask = torch.stack([torch.full((24, 32), 0.25), torch.zeros(24, 32)])
    out = noised_reference(image, "fade", 1.0, seed=0, mask=mask)
    torch.testing.assert_close(out[0], 0.75 * image[0] + 0.125, rtol=0, atol=1e-7)
    assert torch.equal(out[1], image[1])
    negative = noised_reference(image, "gaussian", 1.0, seed=0, mask=-torch.ones(24, 32))  # [H, W] mask accepted
    assert torch.equal(negative, image)


def test_shuffle_in_a_mask_keeps_the_colours_inside_it():
    image = photo(height=20, width=20, seed=3)
    mask = torch.zeros(1, 20, 20)
    mask[0, 5:15, 5:15] = 1.0
    out = noised_reference(image, "shuffle", 1.0, seed=6, mask=mask)
    inside = mask[0] > 0
    assert torch.equal(sorted_colours(out[0][inside]), sorted_colours(image[0][inside]))
    assert bool((out[0][inside] != image[0][inside]).any(dim=-1).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_returns_the_input_dtype_computed_in_float32(dtype):
    image = photo(seed=5).to(dtype)
    mask = torch.zeros(1, 24, 32)
    mask[:, :, :16] = 1.0
    out = noised_reference(image, "gaussian", 0.3, seed=9, mask=mask)
    assert out.dtype == dtype and out.device == image.device and out.shape == image.shape
    expected = noised_reference(image.float(), "gaussian", 0.3, seed=9, mask=mask).to(dtype)
    assert torch.equal(out[:, :, :16], expected[:, :, :16])
    assert torch.equal(out[:, :, 16:], image[:, :, 16:])  # untouched values keep their full precision


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_result_on_the_gpu():
    image = photo(batch=2, channels=4)
    for mode in MODES:
        on_gpu = noised_reference(image.cuda(), mode, 0.6, seed=3, mask=torch.ones(1, 24, 32).cuda())
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), noised_reference(image, mode, 0.6, seed=3)), mode


@pytest.mark.parametrize("call, error", [
    (dict(mode="pink"), r"Reference Noise mode is 'pink', which is not a mode\. Choose one of 'gaussian', "
                        r"'shuffle', 'fade', 'blur'\."),
    (dict(strength=1.5), r"strength is 1\.5, outside its range\. Set it to a number between 0 and 1\. 0 leaves"),
    (dict(strength=-0.1), r"strength is -0\.1, outside its range"),
    (dict(strength=NAN), r"strength is nan, not a finite number\. Set it to a finite number between 0 and 1"),
    (dict(strength="0.5"), r"strength is '0\.5', not a number"),
    (dict(seed=-1), r"seed is -1, outside its range"),
    (dict(seed=2 ** 64), r"seed is 18446744073709551616, outside its range"),
    (dict(seed=1.5), r"seed is 1\.5, not a whole number"),
    (dict(images=torch.full((1, 8, 8, 3), NAN)), r"The Reference Noise image holds 192 NaN value\(s\) out of 192, "
                                                r"so every result computed from it would be NaN\. Check the node"),
    (dict(images=torch.zeros(8, 8, 3)), r"The Reference Noise image has shape \[8, 8, 3\], not \[batch, height, "
                                       r"width, channels\]"),
    (dict(images=torch.zeros(1, 8, 8, 3, dtype=torch.uint8)), r"The Reference Noise image is a torch\.uint8 tensor, "
                                                             r"not a float image"),
    (dict(mask=torch.ones(1, 8, 9)), r"The Reference Noise mask has shape \[1, 8, 9\] but the image is 8x8 "
                                     r"\(width x height\): the mask must be \[batch, 8, 8\]\. Resize the mask"),
    (dict(mask=torch.ones(3, 8, 8)), r"The Reference Noise mask batch holds 3 masks but the image batch holds 2 "
                                     r"images\. Give one mask for all images, or one per image\."),
    (dict(mask=torch.full((1, 8, 8), INF)), r"The Reference Noise mask holds 64 infinite value\(s\) out of 64.*Give a "
                                            r"mask with values in 0\.\.1\."),
    (dict(mask=[[1.0]]), r"The Reference Noise mask is a list, not a tensor"),
])
def test_every_bad_input_is_refused_with_what_to_do(call, error):
    arguments = dict(images=torch.rand(2, 8, 8, 3), mode="gaussian", strength=0.5, seed=0)
    arguments.update(call)
    with pytest.raises(ValueError, match=error):
        noised_reference(**arguments)
