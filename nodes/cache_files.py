"""Save DreamCache / Load DreamCache: keep a reference cache as .safetensors and reuse it."""
import os

import folder_paths

from ..dreamcache_core.cache import load_cache, save_cache
from .model_folders import CACHE_FOLDER, CACHE_OUTPUT_SUBFOLDER
from .widget_checks import validation_result


def filename_prefix_problem(prefix):
    """None for a usable prefix (or none given), else why no file can be named after it."""
    if prefix is not None and "\x00" in prefix:
        return ("filename_prefix contains a NUL character (\\x00), which no file name may hold. Retype the prefix, "
                f"e.g. '{CACHE_OUTPUT_SUBFOLDER}/reference'.")
    return None


class DreamCacheSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cache": ("DREAMCACHE", {"tooltip": "The cache to save."}),
                "filename_prefix": ("STRING", {"default": f"{CACHE_OUTPUT_SUBFOLDER}/reference",
                                               "tooltip": "Path under ComfyUI/output; files in output/dreamcache are "
                                                          "listed by Load DreamCache."}),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "DreamCache"
    DESCRIPTION = "Saves a DreamCache (fp16 features, masks, model signature) as .safetensors."

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        """Checked when the prompt is queued (a linked prefix is checked when the node runs)."""
        return validation_result([filename_prefix_problem(filename_prefix)])

    def save(self, cache, filename_prefix):
        problem = filename_prefix_problem(filename_prefix)
        if problem:
            raise ValueError(problem)
        output_dir = folder_paths.get_output_directory()
        full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        file = f"{filename}_{counter:05}_.safetensors"
        save_cache(cache, os.path.join(full_folder, file))
        return {"ui": {"dreamcache": [{"filename": file, "subfolder": subfolder, "type": "output"}]}}


class DreamCacheLoad:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cache_name": (folder_paths.get_filename_list(CACHE_FOLDER), {
                    "tooltip": "A cache saved by Save DreamCache (ComfyUI/output/dreamcache or models/dreamcache_caches)."}),
            }
        }

    RETURN_TYPES = ("DREAMCACHE",)
    OUTPUT_TOOLTIPS = ("The loaded reference cache.",)
    FUNCTION = "load"
    CATEGORY = "DreamCache"
    DESCRIPTION = "Loads a saved DreamCache, so a reference is encoded once and reused across workflows."

    def load(self, cache_name):
        return (load_cache(folder_paths.get_full_path_or_raise(CACHE_FOLDER, cache_name)),)


NODE_CLASS_MAPPINGS = {"DreamCacheSave": DreamCacheSave, "DreamCacheLoad": DreamCacheLoad}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheSave": "Save DreamCache", "DreamCacheLoad": "Load DreamCache"}
