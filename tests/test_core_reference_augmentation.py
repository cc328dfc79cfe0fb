"""The authors' online reference augmentation: its rates, its guarantees, its determinism (plain torch).

Rates are measured over N = 3000 draws of the trainer's counter-based generators; each is checked within
5 binomial standard deviations, sqrt(p (1 - p) / N), of the authors' probability (a fixed-seed test, so it
passes or fails every time; 5 sd would be a 1-in-1.7-million miss for a correct implementation).
"""
import math

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.training import reference_augmentation as ra
from comfyui_dreamcache.dreamcache_core.training.sample_draws import draw_sample, generator_for

N = 3000
SIZE = 32


def within_5_sd(count: int, p: float, n: int = N) -> bool:
    return abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def two_colour_subject(height=24, width=30):
    """A photo whose subject (mask) is red on its left half and blue on its right half, on a green background."""
    image = torch.zeros(height, width, 3)
    image[..., 1] = 0.6
    mask = torch.zeros(height, width)
    top, bottom, left, right = 4, 20, 3, 27
    mask[top:bottom, left:right] = 1
    middle = (left + right) // 2
    image[top:bottom, left:middle] = torch.tensor([0.9, 0.1, 0.1])
    image[top:bottom, middle:right] = torch.tensor([0.1, 0.1, 0.9])
    return image, mask, (bottom - top, right - left)


@pytest.fixture(scope="module")
def draws():
    torch.set_num_threads(1)
    image, mask, subject = two_colour_subject()
    results = []
    for draw in range(N):
        generator = draw_sample(7, draw, 10, 0.0, 0.0).augment_generator()
        results.append(ra.augment_reference(image, mask, SIZE, generator))
    return {"results": results, "subject": subject, "image": image, "mask": mask}


def test_flip_erase_and_jitter_rates_are_the_authors(draws):
    records = [record for _, _, record in draws["results"]]
    settings = ra.AuthorsAugmentation()
    assert within_5_sd(sum(r.flipped for r in records), settings.flip_p)
    # every erase box fits a 32 px square at the first try (its longest side is at most sqrt(0.25 * 3.3) of it)
    assert within_5_sd(sum(r.erased is not None for r in records), settings.erase_p)
    assert within_5_sd(sum(r.jitter is not None for r in records), settings.jitter_p)
    assert (settings.flip_p, settings.erase_p, settings.jitter_p) == (0.5, 0.4, 0.1)


def test_flips_are_seen_in_the_pixels(draws):
    """The red half of the subject is left of the blue half exactly when the draw did not flip."""
    for image, mask, record in draws["results"][:400]:
        subject = mask >= 0.5
        red = subject & (image[..., 0] > image[..., 2] + 0.3)
        blue = subject & (image[..., 2] > image[..., 0] + 0.3)
        if red.sum() < 2 or blue.sum() < 2:  # erased away
            continue
        columns = torch.arange(SIZE).float()
        red_x = (red.float().sum(0) * columns).sum() / red.sum()
        blue_x = (blue.float().sum(0) * columns).sum() / blue.sum()
        assert (red_x > blue_x) == record.flipped


def test_erased_boxes_are_white_and_cover_two_to_twentyfive_percent(draws):
    fractions = []
    for image, mask, record in draws["results"]:
        if record.erased is None:
            continue
        top, left, height, width = record.erased
        assert torch.equal(image[top:top + height, left:left + width], torch.ones(height, width, 3))
        assert not bool(mask[top:top + height, left:left + width].any())
        area = height * width
        # the box is drawn with area A in [0.02, 0.25] x S^2 and rounded sides: |h w - A| <= (h + w) / 2 + 1/4
        slack = (height + width) / 2 + 0.25
        assert 0.02 * SIZE ** 2 - slack <= area <= 0.25 * SIZE ** 2 + slack
        fractions.append(area / SIZE ** 2)
    # A is uniform on [0.02, 0.25]: its mean 0.135 within 5 sd (0.066 / sqrt(n)) plus the rounding
    assert abs(sum(fractions) / len(fractions) - 0.135) < 5 * 0.0664 / math.sqrt(len(fractions)) + 0.01


def test_subject_stays_whole_and_spans_at_least_seventy_percent(draws):
    """RandomResizeForeground: the whole subject is pasted (nothing cut off) with its longer side >= 0.7 S."""
    subject_height, subject_width = draws["subject"]
    sides = []
    for image, mask, record in draws["results"]:
        top, left, height, width = record.box
        assert top >= 0 and left >= 0 and top + height <= SIZE and left + width <= SIZE  # fully inside
        assert max(height, width) >= int(0.7 * SIZE)
        assert abs(height / width - subject_height / subject_width) < 2 / min(height, width)  # aspect kept
        if record.erased is None:
            rows = torch.nonzero((mask >= 0.5).any(1)).flatten()
            cols = torch.nonzero((mask >= 0.5).any(0)).flatten()
            kept_height, kept_width = int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1
            assert abs(kept_height - height) <= 1 and abs(kept_width - width) <= 1  # the whole subject is there
            sides.append(max(kept_height, kept_width) / SIZE)
    assert min(sides) >= 0.7 - 1 / SIZE and max(sides) == 1.0


def test_background_is_white_even_when_jittered(draws):
    jittered = 0
    for image, mask, record in draws["results"]:
        background = mask == 0
        assert bool((image[background] >= 1 - 1e-5).all())
        jittered += record.jitter is not None
    assert jittered > 0


def test_jitter_changes_the_subject_within_the_authors_ranges(draws):
    image, mask = draws["image"], draws["mask"]
    for _, _, record in draws["results"]:
        if record.jitter is None:
            continue
        brightness, contrast, saturation, hue, order = record.jitter
        assert 0.8 <= brightness <= 1.2 and 0.8 <= contrast <= 1.2 and 0.8 <= saturation <= 1.2
        assert -0.05 <= hue <= 0.05 and sorted(order) == [0, 1, 2, 3]
    # the same generator without the jitter gives another subject colour and the same background
    settings = ra.AuthorsAugmentation(jitter_p=1.0, erase_p=0.0)
    plain = ra.AuthorsAugmentation(jitter_p=0.0, erase_p=0.0)
    a, mask_a, _ = ra.augment_reference(image, mask, SIZE, generator_for("jitter", 1), settings)
    b, mask_b, _ = ra.augment_reference(image, mask, SIZE, generator_for("jitter", 1), plain)
    assert torch.equal(mask_a, mask_b)
    assert not torch.allclose(a[mask_a >= 0.5], b[mask_b >= 0.5], atol=1e-3)
    assert torch.equal(a[mask_a == 0], b[mask_b == 0])


def test_hue_shift_matches_torchvision():
    functional = pytest.importorskip("torchvision.transforms.functional")
    image = torch.rand(3, 12, 12, generator=generator_for("hue"))
    for shift in (-0.05, 0.02, 0.3):
        assert torch.allclose(ra._shift_hue(image, shift), functional.adjust_hue(image, shift), atol=1e-5)


def test_empty_caption_rate_is_the_authors_with_augment_authors():
    from comfyui_dreamcache.dreamcache_core.training.train import build_parser, settle_caption_dropout

    args = build_parser().parse_args(["--data", "x"])
    settle_caption_dropout(args, augmented=True)
    assert args.caption_dropout == 0.07
    empty = sum(draw_sample(3, d, 50, args.caption_dropout, 0.0).drop_caption for d in range(N))
    assert within_5_sd(empty, 0.07)
    args = build_parser().parse_args(["--data", "x"])
    settle_caption_dropout(args, augmented=False)
    assert args.caption_dropout == 0.05  # manifests keep their default


def test_same_draw_same_reference_other_draw_other_reference():
    image, mask, _ = two_colour_subject()
    one = draw_sample(5, 17, 10, 0.0, 0.0)
    again = draw_sample(5, 17, 10, 0.0, 0.0)
    a = ra.augment_reference(image, mask, SIZE, one.augment_generator())
    b = ra.augment_reference(image, mask, SIZE, again.augment_generator())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    others = [ra.augment_reference(image, mask, SIZE, draw_sample(5, d, 10, 0.0, 0.0).augment_generator())[0]
              for d in range(18, 22)]
    assert all(not torch.equal(a[0], other) for other in others)
    # the augmentation's own stream leaves the draw's other randomness as it was
    assert (one.index, one.timestep, one.generator_seed) == (again.index, again.timestep, again.generator_seed)


def test_canonical_reference_is_the_subject_centred_on_white():
    image, mask, (height, width) = two_colour_subject()
    reference, reference_mask = ra.canonical_reference(image, mask, SIZE)
    rows = torch.nonzero((reference_mask >= 0.5).any(1)).flatten()
    cols = torch.nonzero((reference_mask >= 0.5).any(0)).flatten()
    assert int(cols[-1] - cols[0]) + 1 == SIZE  # the longer side (width) fills the square
    assert abs((int(rows[-1] - rows[0]) + 1) - round(height * SIZE / width)) <= 1
    assert abs(int(rows[0]) - (SIZE - int(rows[-1]) - 1)) <= 1  # centred
    assert bool((reference[reference_mask == 0] >= 1 - 1e-5).all())
    greenish = (reference[..., 1] > reference[..., 0] + 0.2) & (reference[..., 1] > reference[..., 2] + 0.2)
    assert not bool(greenish.any())  # none of the photo's green background is left


def test_empty_mask_is_an_unusable_row():
    from comfyui_dreamcache.dreamcache_core.training.training_manifest import UnusableRow

    image, _, _ = two_colour_subject()
    with pytest.raises(UnusableRow, match="marks no subject"):
        ra.augment_reference(image, torch.zeros(image.shape[:2]), SIZE, generator_for("x"))
    assert ra.augmentation_settings("none") is None and ra.augmentation_settings("authors") == ra.AuthorsAugmentation()
    with pytest.raises(ValueError, match="authors, none"):
        ra.augmentation_settings("strong")
