"""Tiny public-data-shaped fixtures built in the test: an authors'-layout folder and Subjects200K parquet files.

Subjects are coloured boxes (one colour per object) on a grey background, so a stand-in segmenter can cut them
out exactly (``colour_segmenter``) where the segmenter itself is not under test.
"""
import io
import os

import torch

BACKGROUND = (0.5, 0.5, 0.5)
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.1, 0.2, 0.9), (0.9, 0.8, 0.1), (0.7, 0.1, 0.8), (0.1, 0.8, 0.8)]


def subject_photo(colour, side=48, box=None, seed=0):
    """(image [side, side, 3], mask [side, side]): a box of ``colour`` with a darker left quarter, on grey."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.tensor(BACKGROUND).expand(side, side, 3).clone()
    image += 0.02 * torch.rand(side, side, 3, generator=generator)  # a little texture, so images are not flat
    top, left, bottom, right = box or (side // 5, side // 4, side - side // 6, side - side // 5)
    mask = torch.zeros(side, side)
    mask[top:bottom, left:right] = 1
    image[top:bottom, left:right] = torch.tensor(colour)
    quarter = left + (right - left) // 4
    image[top:bottom, left:quarter] = torch.tensor(colour) * 0.5
    return image.clamp(0, 1), mask


def write_authors_layout(root, objects=3, stems=2, side=48):
    """``root/<object>/<stem>_{generation,caption,mask}``: ``objects`` x ``stems`` good triplets. Returns the list
    of (object, stem, caption)."""
    from comfyui_dreamcache.dreamcache_core.io.image_files import save_png

    made = []
    for o in range(objects):
        for s in range(stems):
            folder = os.path.join(root, f"object_{o:03d}")
            stem = f"{s:04d}"
            box = (6 + 2 * s, 8 + s, side - 6, side - 10 + s)
            image, mask = subject_photo(COLOURS[o % len(COLOURS)], side, box, seed=10 * o + s)
            save_png(image, os.path.join(folder, f"{stem}_generation.png"), quantize="round")
            save_png(mask, os.path.join(folder, f"{stem}_mask.png"), quantize="round")
            caption = f"a {['red', 'green', 'blue', 'yellow', 'purple', 'cyan'][o % 6]} toy number {s} on a table"
            with open(os.path.join(folder, f"{stem}_caption.txt"), "w", encoding="utf-8") as handle:
                handle.write(caption + "\n")
            made.append((f"object_{o:03d}", stem, caption))
    return made


def png_bytes(image):
    from comfyui_dreamcache.dreamcache_core.io.image_files import image_to_pil

    buffer = io.BytesIO()
    image_to_pil(image, "round").save(buffer, format="PNG")
    return buffer.getvalue()


def two_view_picture(colour, tile=64, seed=0, frame=None):
    """Subjects200K's picture: two square views side by side on white, where OminiControl's crops find them
    (frame p = 8 / 528 of the height: left view at x = p, right view at x = side + 2 p, both at y = p)."""
    frame = round((tile / (1 - 2 * 8 / 528)) * 8 / 528) if frame is None else frame
    height = tile + 2 * frame
    picture = torch.ones(height, 2 * height, 3)
    left, _ = subject_photo(colour, tile, (10, 8, tile - 8, tile - 14), seed)
    right, _ = subject_photo(colour, tile, (14, 16, tile - 6, tile - 6), seed + 1)
    picture[frame:frame + tile, frame:frame + tile] = left
    picture[frame:frame + tile, tile + 2 * frame:2 * tile + 2 * frame] = right
    return picture


def subjects200k_record(number, quality=(5, 5, 5), image=None, descriptions=None, item="toy", valid=True,
                        tile=64):
    colour = COLOURS[number % len(COLOURS)]
    picture = png_bytes(two_view_picture(colour, tile, seed=number)) if image is None else image
    d0, d1 = descriptions or (f"a toy {number} on a shelf, left view", f"a toy {number} in a garden, right view")
    return {"image": {"bytes": picture, "path": f"{number}.png"}, "collection": "collection_1",
            "quality_assessment": {"compositeStructure": quality[0], "objectConsistency": quality[1],
                                   "imageQuality": quality[2]},
            "description": {"item": item, "description_0": d0, "description_1": d1, "category": "Toys",
                            "description_valid": valid}}


def subjects200k_schema():
    import pyarrow as pa

    return pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("collection", pa.string()),
        ("quality_assessment", pa.struct([("compositeStructure", pa.int64()), ("objectConsistency", pa.int64()),
                                          ("imageQuality", pa.int64())])),
        ("description", pa.struct([("item", pa.string()), ("description_0", pa.string()),
                                   ("description_1", pa.string()), ("category", pa.string()),
                                   ("description_valid", pa.bool_())])),
    ])


def write_subjects200k(path, records, row_group_size=2):
    """A parquet file with Subjects200K's schema (as the ``datasets`` library writes it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    table = pa.Table.from_pylist(records, schema=subjects200k_schema())
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def colour_segmenter(threshold=0.15):
    """(image, noun) -> Detection: the pixels far from the grey background and from white (score 0.9)."""
    from comfyui_dreamcache.dreamcache_core.masking.subject_filters import Detection

    def segment(image, noun):
        grey = torch.tensor(BACKGROUND)
        far_from_grey = (image - grey).abs().amax(-1) > threshold
        not_white = image.amin(-1) < 0.95
        return Detection((far_from_grey & not_white).float(), 0.9)

    return segment
