"""Save DreamCache / Load DreamCache: keep a reference cache as .safetensors and reuse it."""
import os

import folder_paths

from ..dreamcache_core.cache import load_cache, save_cache
from .model_folders import CACHE_FOLDER, CACHE_OUTPUT_SUBFOLDER


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

    def save(self, cache, filename_prefix):
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
