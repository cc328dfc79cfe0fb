"""Save DreamCache / Load DreamCache: keep a reference cache as .safetensors and reuse it."""
import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..dreamcache_core.io.cache_files import load_cache, save_cache
from .io_types import CATEGORY_CACHE, Cache
from .model_folders import CACHE_FOLDER, CACHE_OUTPUT_SUBFOLDER
from .widget_checks import validation_result


NAME_MAX_BYTES = 255  # the longest file or folder name ext4, XFS, btrfs, APFS and NTFS allow (bytes in UTF-8)
SAVED_SUFFIX = "_00000_.safetensors"  # what Save adds to the prefix's last part (the counter may grow it)


def filename_prefix_problem(prefix):
    """None for a usable prefix (or none given), else why no file can be named after it."""
    if prefix is None:
        return None
    example = f"Retype the prefix, e.g. '{CACHE_OUTPUT_SUBFOLDER}/reference'."
    if "\x00" in prefix:
        return f"filename_prefix contains a NUL character (\\x00), which no file name may hold. {example}"
    parts = prefix.replace("\\", "/").split("/")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        size = len((part + (SAVED_SUFFIX if last else "")).encode("utf-8", "surrogatepass"))
        if size > NAME_MAX_BYTES:
            shown = part if len(part) <= 40 else f"{part[:40]}... ({len(part)} characters)"
            what = (f"its file name part '{shown}' makes a file name of {size} bytes (with the "
                    f"'{SAVED_SUFFIX}' Save adds)") if last else f"its folder name '{shown}' is {size} bytes long"
            return (f"filename_prefix is too long for the file system: {what}, and file systems allow at most "
                    f"{NAME_MAX_BYTES} bytes per name. Shorten it, e.g. '{CACHE_OUTPUT_SUBFOLDER}/reference'.")
    return None


class DreamCacheSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheSave",
            display_name="Save DreamCache",
            category=CATEGORY_CACHE,
            description="Saves a DreamCache (fp16 features, masks, model signature) as .safetensors.",
            inputs=[
                Cache.Input("cache", tooltip="The cache to save."),
                io.String.Input("filename_prefix", default=f"{CACHE_OUTPUT_SUBFOLDER}/reference",
                                tooltip="Path under ComfyUI/output; files in output/dreamcache are listed by Load "
                                        "DreamCache."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        """Checked when the prompt is queued (a linked prefix is checked when the node runs)."""
        return validation_result([filename_prefix_problem(filename_prefix)])

    @classmethod
    def execute(cls, cache, filename_prefix):
        problem = filename_prefix_problem(filename_prefix)
        if problem:
            raise ValueError(problem)
        output_dir = folder_paths.get_output_directory()
        full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        file = f"{filename}_{counter:05}_.safetensors"
        try:
            save_cache(cache, os.path.join(full_folder, file))
        except OSError as error:  # the file system's own limits (path length, permissions, a full disk)
            raise OSError(f"Save DreamCache could not write {file[:60]!r} into {full_folder[:200]!r} "
                          f"({error.strerror or error}). Check filename_prefix (shorter, no special characters) "
                          "and that ComfyUI's output folder is writable with free space.") from error
        return io.NodeOutput(ui={"dreamcache": [{"filename": file, "subfolder": subfolder, "type": "output"}]})


class DreamCacheLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheLoad",
            display_name="Load DreamCache",
            category=CATEGORY_CACHE,
            description="Loads a saved DreamCache, so a reference is encoded once and reused across workflows.",
            inputs=[
                io.Combo.Input("cache_name", options=folder_paths.get_filename_list(CACHE_FOLDER),
                               tooltip="A cache saved by Save DreamCache (ComfyUI/output/dreamcache or "
                                       "models/dreamcache_caches)."),
            ],
            outputs=[Cache.Output(display_name="cache", tooltip="The loaded reference cache.")],
        )

    @classmethod
    def execute(cls, cache_name):
        return io.NodeOutput(load_cache(folder_paths.get_full_path_or_raise(CACHE_FOLDER, cache_name)))


NODES = [DreamCacheSave, DreamCacheLoad]
