"""Save DreamCache / Load DreamCache: keep a reference cache as .safetensors and reuse it."""
import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..dreamcache_core.method.cache import load_cache, save_cache
from .io_types import CATEGORY_CACHE, Cache
from .model_folders import CACHE_FOLDER, CACHE_OUTPUT_SUBFOLDER
from .widget_checks import validation_result


def filename_prefix_problem(prefix):
    """None for a usable prefix (or none given), else why no file can be named after it."""
    if prefix is not None and "\x00" in prefix:
        return ("filename_prefix contains a NUL character (\\x00), which no file name may hold. Retype the prefix, "
                f"e.g. '{CACHE_OUTPUT_SUBFOLDER}/reference'.")
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
        save_cache(cache, os.path.join(full_folder, file))
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
