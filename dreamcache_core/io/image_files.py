"""Image and mask files, read and written the one way the whole pack uses (plain torch + PIL).

Tensors are channel-last float in 0..1, as ComfyUI holds them, without a batch dimension:

- ``load_image(path)``                     -> [H, W, C]; C = 4 when the file has transparency, else 3
- ``load_image(path, transparency="white")`` -> [H, W, 3], transparency composited onto white
- ``load_mask(path)``                      -> [H, W], white = subject (the alpha channel when there is one)
- ``save_png(image, path)``                   [H, W, 3] or [H, W] -> PNG

A ComfyUI IMAGE / MASK is the same tensor with a batch dimension in front (``load_image(path)[None]``).
Pixels are read as uint8 / 255 in float32, so a file saved with ``save_png`` reads back bit for bit.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TRANSPARENCY_MODES = ("keep", "white")
QUANTIZE_MODES = ("round", "truncate")


def is_image_name(name: str) -> bool:
    """True for a visible file whose extension is one of IMAGE_EXTENSIONS."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def list_images(folder: str) -> list[str]:
    """The image files directly inside ``folder``, sorted by path."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if is_image_name(name))


def _pixels(image, channels: int) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    shape = (image.size[1], image.size[0]) + ((channels,) if channels > 1 else ())
    return data.view(*shape).float() / 255.0


def _has_transparency(image) -> bool:
    return image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)


def load_image(path: str, transparency: str = "keep") -> torch.Tensor:
    """An image file as float [H, W, C] in 0..1, turned upright by its EXIF orientation.

    ``transparency="keep"`` returns RGBA (C = 4) when the file has transparency and RGB otherwise;
    ``"white"`` always returns RGB, transparent pixels composited onto white.
    """
    from PIL import Image, ImageOps

    if transparency not in TRANSPARENCY_MODES:
        raise ValueError(f"transparency must be one of {TRANSPARENCY_MODES}, got {transparency!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image not found: {path}")
    with Image.open(path) as handle:
        image = ImageOps.exif_transpose(handle)
        if _has_transparency(image):
            image = image.convert("RGBA")
            if transparency == "keep":
                return _pixels(image, 4)
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        return _pixels(image.convert("RGB"), 3)


def load_mask(path: str) -> torch.Tensor:
    """A mask file as float [H, W] in 0..1, white = subject; a file with an alpha channel gives its alpha."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Mask not found: {path}")
    with Image.open(path) as image:
        plane = image.getchannel("A") if image.mode in ("RGBA", "LA") else image.convert("L")
        return _pixels(plane, 1)


def check_image_file(path: str, what: str) -> Optional[str]:
    """None when ``path`` is a readable, non-empty image, else the reason it is not (``what`` names it)."""
    if not os.path.isfile(path):
        return f"{what} file not found: {path}"
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            if image.size[0] < 1 or image.size[1] < 1:
                return f"{what} image is empty: {path}"
    except Exception as error:  # PIL raises many types for broken files
        return f"{what} image cannot be read ({type(error).__name__}: {error}): {path}"
    return None


def image_to_pil(image: torch.Tensor, quantize: str = "truncate"):
    """[H, W, 3] (or [H, W]) float 0..1 -> PIL image.

    ``quantize="truncate"`` is ComfyUI's SaveImage conversion (clip, then cut to uint8), so a sampled image saved
    here has the bytes ComfyUI would save. ``"round"`` rounds to the nearest level, so an image read by
    ``load_image`` (exact multiples of 1/255) is written back unchanged.
    """
    from PIL import Image

    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}.")
    scaled = image.detach().cpu().float().clamp(0, 1) * 255.0
    array = (scaled.round() if quantize == "round" else scaled).to(torch.uint8).numpy()
    return Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")


def save_png(image: torch.Tensor, path: str, text: Optional[dict] = None, quantize: str = "truncate") -> None:
    """Write [H, W, 3] or [H, W] float 0..1 as PNG (folders made as needed).

    ``text`` becomes PNG text chunks (values that are not strings as JSON), as ComfyUI stores its prompt;
    ``quantize`` is as in ``image_to_pil``.
    """
    from PIL.PngImagePlugin import PngInfo

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    image_to_pil(image, quantize).save(path, pnginfo=info, compress_level=4)
