"""The one image I/O module: what each read returns, and that writes read back bit for bit."""
import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_dreamcache.dreamcache_core.io.image_files import (check_image_file, image_to_pil, list_images, load_image,
                                                               load_mask, save_png)


def _rgba_file(path):
    pixels = np.zeros((5, 7, 4), dtype=np.uint8)
    pixels[..., 0] = np.arange(7, dtype=np.uint8)[None, :] * 30
    pixels[..., 1] = 200
    pixels[..., 3] = np.array([0, 64, 128, 255, 255], dtype=np.uint8)[:, None]
    Image.fromarray(pixels, mode="RGBA").save(path)
    return pixels


def test_rgba_is_kept_or_composited_on_white(tmp_path):
    path = str(tmp_path / "subject.png")
    pixels = _rgba_file(path)
    kept = load_image(path)
    assert kept.shape == (5, 7, 4) and kept.dtype == torch.float32
    assert torch.equal(kept, torch.from_numpy(pixels.astype(np.float32) / 255.0))
    white = load_image(path, transparency="white")
    assert white.shape == (5, 7, 3)
    assert torch.equal(white[0], torch.ones(7, 3))                          # alpha 0: pure white
    assert torch.equal(white[3:], kept[3:, :, :3])                          # alpha 255: the colour itself
    composite = Image.alpha_composite(Image.new("RGBA", (7, 5), (255, 255, 255, 255)), Image.fromarray(pixels))
    assert torch.equal(white, torch.from_numpy(np.asarray(composite.convert("RGB")).astype(np.float32) / 255.0))
    # the mask of an RGBA file is its alpha
    assert torch.equal(load_mask(path), torch.from_numpy(pixels[..., 3].astype(np.float32) / 255.0))


def test_rgb_reads_the_same_in_both_modes_and_round_trips(tmp_path):
    image = torch.randint(0, 256, (9, 6, 3), generator=torch.Generator().manual_seed(0)).float() / 255.0
    mask = torch.randint(0, 256, (9, 6), generator=torch.Generator().manual_seed(1)).float() / 255.0
    save_png(image, str(tmp_path / "a" / "image.png"), quantize="round")
    save_png(mask, str(tmp_path / "a" / "mask.png"), quantize="round")
    assert torch.equal(load_image(str(tmp_path / "a" / "image.png")), image)
    assert torch.equal(load_image(str(tmp_path / "a" / "image.png"), transparency="white"), image)
    assert torch.equal(load_mask(str(tmp_path / "a" / "mask.png")), mask)
    assert list_images(str(tmp_path / "a")) == [str(tmp_path / "a" / "image.png"), str(tmp_path / "a" / "mask.png")]


def test_truncation_is_comfyuis_saveimage_and_text_is_stored(tmp_path):
    image = torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(2)) * 1.2 - 0.1
    comfyui = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)       # ComfyUI's SaveImage conversion
    assert np.array_equal(np.asarray(image_to_pil(image)), comfyui)
    rounded = np.asarray(image_to_pil(image, quantize="round"))
    assert np.array_equal(rounded, np.round(np.clip(image.numpy(), 0, 1) * 255.0).astype(np.uint8))
    assert not np.array_equal(rounded, comfyui)
    save_png(image, str(tmp_path / "out.png"), text={"prompt": {"a": 1}, "note": "x"})
    with Image.open(tmp_path / "out.png") as saved:
        assert saved.text == {"prompt": '{"a": 1}', "note": "x"}
        assert np.array_equal(np.asarray(saved), comfyui)


def test_missing_and_broken_files_say_what_happened(tmp_path):
    with pytest.raises(FileNotFoundError, match="Image not found: .*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(FileNotFoundError, match="Mask not found"):
        load_mask(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match="transparency must be one of"):
        load_image(str(tmp_path / "nope.png"), transparency="black")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert "cannot be read" in check_image_file(str(tmp_path / "broken.png"), "reference")
    assert check_image_file(str(tmp_path / "nope.png"), "reference") == f"reference file not found: {tmp_path / 'nope.png'}"
