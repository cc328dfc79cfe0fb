"""Load DreamCache Adapter: a trained adapter file -> DREAMCACHE_ADAPTER."""
import folder_paths

from ..dreamcache_core.adapter_io import load_adapter
from .model_folders import ADAPTER_FOLDER


class DreamCacheAdapterLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter_name": (folder_paths.get_filename_list(ADAPTER_FOLDER), {
                    "tooltip": "The DreamCache adapter: a .safetensors from this pack's training script or converter, "
                               "or the authors' cross_attention-<step>.pt (read with weights_only). "
                               "Files are listed from ComfyUI/models/dreamcache and the pack's models/ folder."}),
            }
        }

    RETURN_TYPES = ("DREAMCACHE_ADAPTER",)
    OUTPUT_TOOLTIPS = ("The conditioning adapters of the memory layers, for Apply DreamCache.",)
    FUNCTION = "load_adapter"
    CATEGORY = "DreamCache"
    DESCRIPTION = "Loads the trained DreamCache conditioning adapters (about 25M parameters for SD1.5/SD2.x)."

    def load_adapter(self, adapter_name):
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name)
        return (load_adapter(path),)


NODE_CLASS_MAPPINGS = {"DreamCacheAdapterLoader": DreamCacheAdapterLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheAdapterLoader": "Load DreamCache Adapter"}
