"""Where DreamCache looks for files inside ComfyUI: the folders of ``dreamcache_core.comfy_bridge.model_folders``
(adapters in ComfyUI/models/dreamcache and the pack's models/, caches in ComfyUI/models/dreamcache_caches and
ComfyUI/output/dreamcache, SAM in ComfyUI/models/sams), shared with the command-line runners."""
from ..dreamcache_core.comfy_bridge.model_folders import (ADAPTER_EXTENSIONS, ADAPTER_FOLDER, CACHE_FOLDER,
                                                          CACHE_OUTPUT_SUBFOLDER, PACK_MODELS_DIR, SAM_FILE_EXTENSIONS,
                                                          SAM_FOLDER, register_model_folders)

__all__ = ["ADAPTER_EXTENSIONS", "ADAPTER_FOLDER", "CACHE_FOLDER", "CACHE_OUTPUT_SUBFOLDER", "PACK_MODELS_DIR",
           "SAM_FILE_EXTENSIONS", "SAM_FOLDER", "register_model_folders"]
