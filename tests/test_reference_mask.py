"""The reference cut-out (subject centred on white) and the model-free SAM prompt.

The core tests need only torch; the node tests at the end use the ``comfy``
fixture and skip without COMFYUI_PATH.
"""
import logging

import numpy as np
import pytest
import torch

from comfyui_dreamcache.dreamcache_core.masking.reference_mask import (
    CROP_POSITIONS,
    DEFAULT_MARGIN,
    Box,
    EmptyMaskError,
    central_salient_box,
    cut_subject_on_white,
    cut_subjects_on_white,
    find_salient_subject,
    image_alpha,
    image_to_rgb,
    mask_bounding_box,
    pick_best_mask,
    resize_mask,
    subject_square,
)

RED = torch.tensor([1.0, 0.0, 0.0])
GREEN = torch.tensor([0.1, 0.6, 0.2])


def scene(height=200, width=300, box=Box(100, 50, 140, 110), background=0.2, colour=RED):
    """A flat-coloured rectangle on a flat background, and its mask."""
    image = torch.full((height, width, 3), background)
    image[box.top:box.bottom, box.left:box.right] = colour
    mask = torch.zeros(height, width)
    mask[box.top:box.bottom, box.left:box.right] = 1.0
    return image, mask


def box_centre(mask):
    box = mask_bounding_box(mask)
    return box.centre, box


# --------------------------------------------------------------------------
# cut_subject_on_white
# --------------------------------------------------------------------------

def test_subject_is_centred_scaled_and_on_exact_white():
    image, mask = scene()  # a 40 x 60 subject off the image centre
    out_image, out_mask = cut_subject_on_white(image, mask, 512)

    assert out_image.shape == (512, 512, 3) and out_mask.shape == (512, 512)
    assert out_image.dtype == torch.float32 and out_mask.dtype == torch.float32
    (centre_x, centre_y), box = box_centre(out_mask)
    assert abs(centre_x - 256) <= 1 and abs(centre_y - 256) <= 1
    # The longest side (60 px) spans 1 / (1 + 2 * margin) of the square.
    assert abs(box.height - 512 / (1 + 2 * DEFAULT_MARGIN)) <= 2
    assert abs(box.width - box.height * 40 / 60) <= 2
    # Where the mask is 0 the image is exactly white; elsewhere it is the
    # subject blended with white: the grey background never shows.
    assert torch.all(out_image[out_mask == 0] == 1.0)
    assert (out_mask == 0).sum() > 0 and (out_mask == 1).sum() > 0
    expected = out_mask[..., None] * RED + (1 - out_mask[..., None])
    torch.testing.assert_close(out_image, expected, atol=1e-5, rtol=0)


def test_soft_mask_blends_with_white_without_background_fringe():
    image, hard_mask = scene(background=0.0, colour=GREEN)
    soft_mask = torch.nn.functional.avg_pool2d(hard_mask[None, None], 9, stride=1, padding=4)[0, 0]
    image[soft_mask > 0] = GREEN  # the subject's colour wherever the mask is not 0
    out_image, out_mask = cut_subject_on_white(image, soft_mask, 256)

    assert ((out_mask > 0.05) & (out_mask < 0.95)).sum() > 0, "the soft edge must survive"
    expected = out_mask[..., None] * GREEN + (1 - out_mask[..., None])
    torch.testing.assert_close(out_image, expected, atol=1e-5, rtol=0)


def test_square_leaving_the_image_is_padded_with_white():
    image, mask = scene(height=100, width=100, box=Box(0, 0, 30, 50))  # subject in the corner
    out_image, out_mask = cut_subject_on_white(image, mask, 128, margin=0.25)
    (centre_x, centre_y), _ = box_centre(out_mask)
    assert abs(centre_x - 64) <= 1 and abs(centre_y - 64) <= 1
    assert torch.all(out_image[:10] == 1.0) and torch.all(out_mask[:10] == 0.0)
    assert torch.all(out_image[:, :10] == 1.0)


def test_subject_square_geometry():
    square = subject_square(Box(10, 20, 50, 80), margin=0.1)  # 40 x 60
    assert square.width == square.height == 72
    assert square.centre == (30.0, 50.0)
    assert subject_square(Box(0, 0, 10, 10), margin=0.0) == Box(0, 0, 10, 10)


# --------------------------------------------------------------------------
# Crop positions: fill the square with a subject that is not square
# --------------------------------------------------------------------------

def striped_scene(box, height=100, width=100, scale=100):
    """Every pixel's colour says where it was: red = row / scale, green = column / scale, blue = 0.5."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width) / scale
    columns = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width) / scale
    image = torch.stack([rows, columns, torch.full((height, width), 0.5)], dim=-1)
    mask = torch.zeros(height, width)
    mask[box.top:box.bottom, box.left:box.right] = 1.0
    return image, mask


def expected_cut(image, mask, rows, columns):
    """The subject on white, cropped to ``rows`` x ``columns`` (slices), without resampling."""
    crop_mask = mask[rows, columns]
    return torch.where(crop_mask[..., None] > 0, image[rows, columns], torch.ones(())), crop_mask


TALL = Box(45, 30, 55, 70)  # 10 wide, 40 high: rows 30..69, columns 45..54
WIDE = Box(30, 45, 70, 55)  # 40 wide, 10 high
# (subject, position) -> (rows, columns) the output square shows; margin 0, so the square is the 10 px short side.
CROPS_WITHOUT_MARGIN = {
    (TALL, "center"): (slice(45, 55), slice(45, 55)),  # 15 rows cut at either end
    (TALL, "top"): (slice(30, 40), slice(45, 55)),
    (TALL, "bottom"): (slice(60, 70), slice(45, 55)),
    (TALL, "left"): (slice(45, 55), slice(45, 55)),  # not a tall subject's direction: as center
    (TALL, "right"): (slice(45, 55), slice(45, 55)),
    (WIDE, "center"): (slice(45, 55), slice(45, 55)),
    (WIDE, "left"): (slice(45, 55), slice(30, 40)),
    (WIDE, "right"): (slice(45, 55), slice(60, 70)),
    (WIDE, "top"): (slice(45, 55), slice(45, 55)),  # not a wide subject's direction: as center
    (WIDE, "bottom"): (slice(45, 55), slice(45, 55)),
}
# The same with margin 0.1: ceil(0.1 * 10) = 1 px on each side, a 12 px square (a white row or column beyond
# each edge of the subject it reaches); and how many of its pixels are subject.
CROPS_WITH_MARGIN = {
    (TALL, "center"): (slice(44, 56), slice(44, 56), 12 * 10),  # 14 rows cut at either end
    (TALL, "top"): (slice(29, 41), slice(44, 56), 11 * 10),  # one white row above the top
    (TALL, "bottom"): (slice(59, 71), slice(44, 56), 11 * 10),
    (TALL, "left"): (slice(44, 56), slice(44, 56), 12 * 10),
    (WIDE, "right"): (slice(44, 56), slice(59, 71), 11 * 10),
    (WIDE, "left"): (slice(44, 56), slice(29, 41), 11 * 10),
    (WIDE, "bottom"): (slice(44, 56), slice(44, 56), 12 * 10),
}


def crop_id(key):
    subject, position = key
    return f"{'tall' if subject == TALL else 'wide'}-{position}"


@pytest.mark.parametrize("subject, position", list(CROPS_WITHOUT_MARGIN), ids=map(crop_id, CROPS_WITHOUT_MARGIN))
def test_crop_position_keeps_the_expected_part_of_the_subject(subject, position):
    image, mask = striped_scene(subject)
    rows, columns = CROPS_WITHOUT_MARGIN[subject, position]
    out_image, out_mask = cut_subject_on_white(image, mask, 10, margin=0.0, position=position)
    expected_image, expected_mask = expected_cut(image, mask, rows, columns)
    assert torch.equal(out_mask, torch.ones(10, 10)), "the subject fills the square"
    assert torch.equal(expected_mask, torch.ones(10, 10))
    assert torch.equal(out_image, expected_image)
    assert subject_square(subject, 0.0, position) == Box(columns.start, rows.start, columns.stop, rows.stop)


@pytest.mark.parametrize("subject, position", list(CROPS_WITH_MARGIN), ids=map(crop_id, CROPS_WITH_MARGIN))
def test_crop_position_margin_is_measured_on_the_short_side(subject, position):
    image, mask = striped_scene(subject)
    rows, columns, subject_pixels = CROPS_WITH_MARGIN[subject, position]
    out_image, out_mask = cut_subject_on_white(image, mask, 12, margin=0.1, position=position)
    expected_image, expected_mask = expected_cut(image, mask, rows, columns)
    assert torch.equal(out_mask, expected_mask)  # the mask follows the same crop
    assert torch.equal(out_image, expected_image)
    assert int(out_mask.sum()) == subject_pixels
    assert torch.equal(cut_subjects_on_white(image[None], mask, 12, 0.1, position)[0][0], out_image)


def test_crop_position_pad_is_the_old_square_exactly():
    for subject in (TALL, WIDE, Box(10, 20, 50, 80)):
        image, mask = striped_scene(subject)
        for size in (10, 64, 37):
            default = cut_subject_on_white(image, mask, size)
            padded = cut_subject_on_white(image, mask, size, DEFAULT_MARGIN, "pad")
            assert torch.equal(default[0], padded[0]) and torch.equal(default[1], padded[1])
        assert subject_square(subject, DEFAULT_MARGIN, "pad") == subject_square(subject, DEFAULT_MARGIN)
    # The tall subject padded: 40 px side, all 40 rows, white columns 30..44 and 55..69 beside it.
    image, mask = striped_scene(TALL)
    out_image, out_mask = cut_subject_on_white(image, mask, 40, margin=0.0)
    expected_image, expected_mask = expected_cut(image, mask, slice(30, 70), slice(30, 70))
    assert torch.equal(out_image, expected_image) and torch.equal(out_mask, expected_mask)
    batch_image, batch_mask = cut_subjects_on_white(image[None], mask, 40, 0.0, "pad")
    assert torch.equal(batch_image[0], out_image) and torch.equal(batch_mask[0], out_mask)


@pytest.mark.parametrize("position", CROP_POSITIONS)
def test_crop_positions_resampled_keep_solid_subject_and_exact_white(position):
    for tall, subject in ((True, Box(100, 20, 140, 180)), (False, Box(60, 80, 260, 120))):  # 40 x 160, 200 x 40
        image, mask = scene(box=subject)
        out_image, out_mask = cut_subject_on_white(image, mask, 64, position=position)
        assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64)
        # image = subject * mask + white * (1 - mask); exactly white where the mask is 0
        expected = out_mask[..., None] * RED + (1 - out_mask[..., None])
        torch.testing.assert_close(out_image, expected, atol=1e-5, rtol=0)
        assert torch.all(out_image[out_mask == 0] == 1.0) and (out_mask == 0).any()
        torch.testing.assert_close(out_image[out_mask == 1], RED.expand(int((out_mask == 1).sum()), 3), atol=1e-6, rtol=0)
        box = mask_bounding_box(out_mask)
        long_span, short_span = (box.height, box.width) if tall else (box.width, box.height)
        if position == "pad":  # the long side spans 1 / 1.2 of the square, the short one a quarter / a fifth of that
            assert abs(long_span - 64 / 1.2) <= 2 and abs(short_span - long_span * (40 / 160 if tall else 40 / 200)) <= 2
            continue
        # the short side spans 1 / 1.2 of the square; the long side is cut where the square ends
        assert abs(short_span - 64 / 1.2) <= 2
        kept_end = position in (("top", "bottom") if tall else ("left", "right"))
        if kept_end:  # the kept end has its margin (64 / 12 px), the cut end touches the square's edge
            assert abs(long_span - 64 * 11 / 12) <= 1
            edge = {"top": box.bottom, "bottom": 64 - box.top, "left": box.right, "right": 64 - box.left}[position]
            assert edge == 64
        else:  # cut at both ends
            assert long_span == 64
        inner = out_mask[box.top + 2:box.bottom - 2, box.left + 2:box.right - 2]
        assert inner.numel() > 0 and torch.all(inner == 1.0), "solid subject stays exactly 1"
        _, full_mask = cut_subject_on_white(image, mask, 64, margin=0.0, position=position)
        assert torch.equal(full_mask, torch.ones(64, 64)), "without a margin the subject covers the whole square"


def test_crop_position_top_keeps_the_top_rows_after_resampling():
    image, mask = striped_scene(TALL)
    top_image, _ = cut_subject_on_white(image, mask, 40, margin=0.0, position="top")
    bottom_image, _ = cut_subject_on_white(image, mask, 40, margin=0.0, position="bottom")
    # Rows 30..39 scaled 4x: red (row / 100) rises from about 0.30 to 0.39; bottom rows 60..69.
    assert 0.295 <= float(top_image[..., 0].min()) and float(top_image[..., 0].max()) <= 0.395
    assert 0.595 <= float(bottom_image[..., 0].min()) and float(bottom_image[..., 0].max()) <= 0.695
    torch.testing.assert_close(top_image[:, :, 0].mean(), torch.tensor(0.345), atol=1e-3, rtol=0)


def test_bad_crop_position_is_an_error_naming_the_choices():
    image, mask = striped_scene(TALL)
    choices = "'pad', 'center', 'top', 'bottom', 'left', 'right'"
    for bad in ("middle", "Top", "", None):
        with pytest.raises(ValueError, match="Choose one of " + choices):
            cut_subject_on_white(image, mask, 16, position=bad)
    with pytest.raises(ValueError, match="Choose one of " + choices):
        cut_subjects_on_white(image[None], mask, 16, DEFAULT_MARGIN, "middle")
    with pytest.raises(ValueError, match="'middle'"):
        subject_square(TALL, 0.1, "middle")


def test_all_foreground_mask_keeps_the_whole_photo():
    torch.manual_seed(0)
    image = torch.rand(48, 64, 3)
    out_image, out_mask = cut_subject_on_white(image, torch.ones(48, 64), 120, margin=0.0)
    # 64 wide -> 120 px; 48 high -> 90 px, centred with white above and below.
    assert mask_bounding_box(out_mask) == Box(0, 15, 120, 105)
    assert torch.all(out_mask[20:100] == 1.0) and torch.all(out_image[:14] == 1.0)
    assert out_image[20:100].std() > 0.1  # the photo, not white


def test_empty_mask_is_a_clear_error():
    image, _ = scene()
    with pytest.raises(EmptyMaskError, match="mask is empty.*Draw the subject"):
        cut_subject_on_white(image, torch.full((200, 300), 0.3), 512)
    with pytest.raises(ValueError, match=r"Image 2 of 3: The mask is empty"):
        masks = torch.stack([scene()[1], torch.zeros(200, 300), scene()[1]])
        cut_subjects_on_white(image[None].expand(3, -1, -1, -1), masks, 64)


def test_bad_shapes_and_arguments_are_errors():
    image, mask = scene()
    with pytest.raises(ValueError, match="resize_mask"):
        cut_subject_on_white(image, mask[:100], 64)
    with pytest.raises(ValueError, match="margin"):
        cut_subject_on_white(image, mask, 64, margin=-0.1)
    with pytest.raises(ValueError, match="5 channels"):
        image_to_rgb(torch.zeros(1, 8, 8, 5))


# --------------------------------------------------------------------------
# Channels, sizes and batches
# --------------------------------------------------------------------------

def test_rgba_colour_is_used_and_alpha_is_offered_as_mask():
    image, mask = scene()
    rgba = torch.cat([image, mask[..., None]], dim=-1)[None]
    assert torch.equal(image_to_rgb(rgba)[0], image)
    assert torch.equal(image_alpha(rgba)[0], mask)
    opaque = torch.cat([image, torch.ones(200, 300, 1)], dim=-1)[None]
    assert image_alpha(opaque) is None and image_alpha(image[None]) is None

    out_image, out_mask = cut_subjects_on_white(rgba, image_alpha(rgba), 128)
    reference_image, reference_mask = cut_subject_on_white(image, mask, 128)
    torch.testing.assert_close(out_image[0], reference_image)
    torch.testing.assert_close(out_mask[0], reference_mask)


def test_grayscale_image_gives_grey_rgb():
    grey = torch.full((1, 64, 64, 1), 0.3)
    grey[0, 20:40, 20:40] = 0.7
    mask = (grey[..., 0] > 0.5).float()
    out_image, out_mask = cut_subjects_on_white(grey, mask, 64)
    assert out_image.shape == (1, 64, 64, 3)
    assert torch.equal(out_image[..., 0], out_image[..., 1]) and torch.equal(out_image[..., 0], out_image[..., 2])
    torch.testing.assert_close(out_image[0, 32, 32], torch.full((3,), 0.7))


def test_tiny_16px_image_is_upscaled():
    image, mask = scene(height=16, width=16, box=Box(4, 4, 12, 12))
    out_image, out_mask = cut_subject_on_white(image, mask, 512)
    (centre_x, centre_y), box = box_centre(out_mask)
    assert abs(centre_x - 256) <= 1 and abs(centre_y - 256) <= 1
    assert abs(box.width - 512 * 8 / 10) <= 2  # 8 px subject in a 10 px square (margin rounds up to 1 px)
    torch.testing.assert_close(out_image[256, 256], RED)


def test_4096px_image_is_downscaled():
    # Grey (one channel) keeps the test's own memory small; the cut-out works
    # on the crop one plane at a time.
    grey = torch.full((1, 4096, 4096, 1), 0.5)
    mask = torch.zeros(1, 4096, 4096)
    mask[0, 1000:3000, 500:2500] = 1.0
    out_image, out_mask = cut_subjects_on_white(grey, mask, 512)
    assert out_image.shape == (1, 512, 512, 3)
    (centre_x, centre_y), box = box_centre(out_mask[0])
    assert abs(centre_x - 256) <= 1 and abs(centre_y - 256) <= 1
    assert abs(box.width - 512 / 1.2) <= 2
    assert torch.all(out_image[0][out_mask[0] == 0] == 1.0)
    torch.testing.assert_close(out_image[0, 256, 256], torch.full((3,), 0.5))


def test_each_image_gets_its_own_mask_and_one_mask_broadcasts():
    boxes = [Box(10, 10, 50, 40), Box(200, 100, 260, 190), Box(120, 60, 160, 120)]
    images, masks = zip(*(scene(box=box) for box in boxes))
    images, masks = torch.stack(images), torch.stack(masks)

    out_images, out_masks = cut_subjects_on_white(images, masks, 96)
    assert out_images.shape == (3, 96, 96, 3) and out_masks.shape == (3, 96, 96)
    for index in range(3):
        single_image, single_mask = cut_subject_on_white(images[index], masks[index], 96)
        torch.testing.assert_close(out_images[index], single_image)
        torch.testing.assert_close(out_masks[index], single_mask)

    out_images, out_masks = cut_subjects_on_white(images, masks[1], 96)  # one mask for all
    assert out_images.shape == (3, 96, 96, 3)
    assert torch.equal(out_masks[0], out_masks[2])
    out_images, _ = cut_subjects_on_white(images[:1], masks, 96)  # one image, three masks
    assert out_images.shape == (3, 96, 96, 3)

    with pytest.raises(ValueError, match="3 images but 2 masks"):
        cut_subjects_on_white(images, masks[:2], 96)


def test_mask_of_another_size_is_resized_to_the_image():
    image, mask = scene()
    small_mask = resize_mask(mask, 100, 150)
    assert small_mask.shape == (100, 150)
    assert resize_mask(mask[None], 100, 150).shape == (1, 100, 150)
    out_image, out_mask = cut_subjects_on_white(image[None], small_mask, 128)
    reference_image, reference_mask = cut_subject_on_white(image, mask, 128)
    (centre_x, centre_y), box = box_centre(out_mask[0])
    assert abs(centre_x - 64) <= 1.5 and abs(centre_y - 64) <= 1.5
    assert abs(box.height - mask_bounding_box(reference_mask).height) <= 3


def test_mask_bounding_box():
    mask = torch.zeros(10, 20)
    mask[2:5, 3:9] = 1.0
    mask[6, 15] = 0.4  # below the 0.5 threshold
    assert mask_bounding_box(mask) == Box(3, 2, 9, 5)
    assert mask_bounding_box(mask, threshold=0.3) == Box(3, 2, 16, 7)
    assert mask_bounding_box(torch.zeros(4, 4)) is None


# --------------------------------------------------------------------------
# Automatic prompt: the most salient central object
# --------------------------------------------------------------------------

@pytest.mark.parametrize("background", [0.5, 1.0])
def test_salient_box_covers_a_coloured_square(background):
    square = Box(90, 60, 170, 140)
    image, _ = scene(height=200, width=300, box=square, background=background, colour=GREEN)
    prompt = find_salient_subject(image)
    box = prompt.box
    assert prompt.found
    assert box.left <= square.left and box.top <= square.top
    assert box.right >= square.right and box.bottom >= square.bottom
    assert box.width <= square.width * 1.15 and box.height <= square.height * 1.15
    point_x, point_y = prompt.point
    assert square.left <= point_x < square.right and square.top <= point_y < square.bottom
    assert central_salient_box(image) == box


def test_salient_box_prefers_the_central_object_on_a_large_image():
    image, _ = scene(height=1200, width=1600, box=Box(700, 500, 900, 700), background=1.0, colour=GREEN)
    image[50:250, 50:250] = RED  # as big, but in the corner
    box = find_salient_subject(image).box
    assert 680 <= box.left <= 700 and 900 <= box.right <= 920
    assert 480 <= box.top <= 500 and 700 <= box.bottom <= 720


def test_uniform_image_falls_back_to_the_centre():
    prompt = find_salient_subject(torch.full((100, 200, 3), 0.4))
    assert not prompt.found
    assert prompt.box == Box(20, 10, 180, 90) and prompt.point == (100.0, 50.0)


def test_pick_best_mask_prefers_a_central_object_over_the_whole_image():
    height, width = 100, 100
    whole = np.ones((height, width), bool)
    central = np.zeros((height, width), bool)
    central[30:70, 30:70] = True
    corner = np.zeros((height, width), bool)
    corner[0:40, 0:40] = True
    empty = np.zeros((height, width), bool)

    assert pick_best_mask(np.stack([whole, central]), np.array([0.95, 0.9]), (height, width)) == 1
    assert pick_best_mask(np.stack([corner, central]), np.array([0.9, 0.9]), (height, width)) == 1
    assert pick_best_mask(np.stack([empty, corner]), np.array([0.99, 0.5]), (height, width)) == 1
    assert pick_best_mask(torch.stack([torch.zeros(4, 4)] * 3), torch.tensor([0.1, 0.3, 0.2]), (4, 4)) == 1
    with pytest.raises(ValueError):
        pick_best_mask(np.stack([central]), np.array([0.5, 0.4]), (height, width))


# --------------------------------------------------------------------------
# The Mask Reference node, called as ComfyUI calls it
# --------------------------------------------------------------------------

def run_mask_reference(**inputs):
    from comfyui_dreamcache.nodes.mask_reference import DreamCacheMaskReference
    from run_as_comfyui import run_node
    return run_node(DreamCacheMaskReference, **inputs)


@pytest.mark.comfy
def test_mask_reference_node_declaration(comfy):
    from comfyui_dreamcache import nodes as pack_nodes
    from comfyui_dreamcache.nodes.mask_reference import DreamCacheMaskReference
    from node_contract import in_pack_category
    assert pack_nodes.NODE_CLASS_MAPPINGS["DreamCacheMaskReference"] is DreamCacheMaskReference
    assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS["DreamCacheMaskReference"] == "Mask Reference"
    inputs = DreamCacheMaskReference.INPUT_TYPES()
    assert list(inputs["required"]) == ["image", "size"]
    assert inputs["required"]["image"][0] == "IMAGE"
    size_type, size_options = inputs["required"]["size"]
    assert size_type == "INT"
    assert (size_options["default"], size_options["min"], size_options["max"], size_options["step"]) == (512, 64, 2048, 8)
    assert inputs["optional"]["sam_model"][0] == "SAM_MODEL" and inputs["optional"]["mask"][0] == "MASK"
    # crop_position: optional and last, so workflows saved before it load unchanged
    assert list(inputs["optional"]) == ["sam_model", "mask", "crop_position"]
    crop_type, crop_options = inputs["optional"]["crop_position"]
    assert crop_type == "COMBO" and crop_options["options"] == ["pad", "center", "top", "bottom", "left", "right"]
    assert crop_options["default"] == "pad"
    assert all(name in crop_options["tooltip"] for name in CROP_POSITIONS)
    for section in inputs.values():
        for name, (_, options) in section.items():
            assert options.get("tooltip"), f"{name} has no tooltip"
    assert tuple(DreamCacheMaskReference.RETURN_TYPES) == ("IMAGE", "MASK")
    assert len(DreamCacheMaskReference.OUTPUT_TOOLTIPS) == 2
    assert in_pack_category(DreamCacheMaskReference.CATEGORY) and DreamCacheMaskReference.DESCRIPTION


@pytest.mark.comfy
def test_mask_reference_node_with_a_mask(comfy):
    image, mask = scene()
    small_mask = resize_mask(mask, 100, 150)[None]  # another size: resized to the image
    out_image, out_mask = run_mask_reference(image=image[None], size=256, mask=small_mask)
    assert out_image.shape == (1, 256, 256, 3) and out_mask.shape == (1, 256, 256)
    (centre_x, centre_y), _ = box_centre(out_mask[0])
    assert abs(centre_x - 128) <= 1.5 and abs(centre_y - 128) <= 1.5
    assert torch.all(out_image[out_mask == 0] == 1.0)


@pytest.mark.comfy
def test_mask_reference_node_uses_transparency(comfy):
    image, mask = scene()
    rgba = torch.cat([image, mask[..., None]], dim=-1)[None]
    out_image, out_mask = run_mask_reference(image=rgba, size=128)
    reference_image, reference_mask = cut_subject_on_white(image, mask, 128)
    torch.testing.assert_close(out_image[0], reference_image)
    torch.testing.assert_close(out_mask[0], reference_mask)


@pytest.mark.comfy
def test_mask_reference_node_errors_say_what_to_do(comfy, caplog):
    image, mask = scene()
    with pytest.raises(ValueError, match="connect a mask .* or a SAM model"):
        run_mask_reference(image=image[None], size=128)
    with pytest.raises(ValueError, match="mask is empty"):
        run_mask_reference(image=image[None], size=128, mask=torch.zeros(1, 200, 300))
    with caplog.at_level(logging.WARNING):
        run_mask_reference(image=image[None], size=128, mask=1.0 - mask[None])
    assert "Invert Mask" in caplog.text


@pytest.mark.comfy
def test_mask_reference_node_crop_position_top(comfy):
    # A 52 x 120 subject: the node's 10 % margin on the short side is ceil(5.2) = 6 px, so the square is
    # 52 + 2 * 6 = 64 px, the output size: no resampling, the crop is exact. "top" keeps rows 34..97
    # (6 white rows above the subject's top row 40) and columns 94..157 (6 white columns either side).
    subject = Box(100, 40, 152, 160)
    image, mask = striped_scene(subject, height=200, width=300, scale=300)
    out_image, out_mask = run_mask_reference(image=image[None], size=64, mask=mask[None], crop_position="top")
    assert out_image.shape == (1, 64, 64, 3) and out_mask.shape == (1, 64, 64)
    expected_image, expected_mask = expected_cut(image, mask, slice(34, 98), slice(94, 158))
    assert torch.equal(out_mask[0], expected_mask) and torch.equal(out_image[0], expected_image)
    assert torch.all(out_mask[0, :6] == 0) and torch.all(out_mask[0, 6:, 6:58] == 1)
    assert torch.all(out_image[0, :6] == 1.0)
    torch.testing.assert_close(out_image[0, 6, 6], torch.tensor([40 / 300, 100 / 300, 0.5]))  # the subject's corner
    # Leaving it out is "pad": the same as the default cut-out.
    padded, _ = run_mask_reference(image=image[None], size=64, mask=mask[None])
    assert torch.equal(padded[0], cut_subject_on_white(image, mask, 64)[0])
    assert not torch.equal(padded[0], out_image[0])


@pytest.mark.comfy
def test_mask_reference_node_rejects_an_unknown_crop_position(comfy):
    from comfyui_dreamcache.nodes.mask_reference import DreamCacheMaskReference
    image, mask = scene()
    choices = "'pad', 'center', 'top', 'bottom', 'left', 'right'"
    # When the prompt is queued (a widget value) ...
    with pytest.raises(ValueError, match=r"ComfyUI refuses the prompt: .*crop_position: .*'middle'.*Choose one of "
                                         + choices):
        run_mask_reference(image=image[None], size=128, mask=mask[None], crop_position="middle")
    assert DreamCacheMaskReference.validate_inputs(crop_position="center") is True
    assert DreamCacheMaskReference.validate_inputs() is True
    # ... and when the node runs (a linked value is not checked at queue time).
    with pytest.raises(ValueError, match="Choose one of " + choices):
        DreamCacheMaskReference.execute(image=image[None], size=128, mask=mask[None], crop_position="Top")
