"""Where DreamCache looks for files inside ComfyUI.

- adapters: ComfyUI/models/dreamcache and the pack's own models/ folder
- caches:   ComfyUI/models/dreamcache_caches and ComfyUI/output/dreamcache (where Save DreamCache writes)
- SAM:      ComfyUI/models/sams
"""
import os

import folder_paths

PACK_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
ADAPTER_FOLDER = "dreamcache"
CACHE_FOLDER = "dreamcache_caches"
CACHE_OUTPUT_SUBFOLDER = "dreamcache"
SAM_FOLDER = "sams"
ADAPTER_EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin"}
SAM_FILE_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".sft")


def _register(name, paths, extensions):
    for path in paths:
        folder_paths.add_model_folder_path(name, path)
    known_paths, known_extensions = folder_paths.folder_names_and_paths[name]
    folder_paths.folder_names_and_paths[name] = (known_paths, set(known_extensions) | set(extensions))


def register_model_folders():
    """Idempotent: ComfyUI's add_model_folder_path skips paths it already has."""
    _register(ADAPTER_FOLDER, [os.path.join(folder_paths.models_dir, ADAPTER_FOLDER), PACK_MODELS_DIR], ADAPTER_EXTENSIONS)
    _register(CACHE_FOLDER, [os.path.join(folder_paths.models_dir, CACHE_FOLDER),
                             os.path.join(folder_paths.get_output_directory(), CACHE_OUTPUT_SUBFOLDER)], {".safetensors"})
    _register(SAM_FOLDER, [os.path.join(folder_paths.models_dir, SAM_FOLDER)], set(SAM_FILE_EXTENSIONS))
