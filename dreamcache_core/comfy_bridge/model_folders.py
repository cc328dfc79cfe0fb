"""Where DreamCache looks for files inside ComfyUI (registered with ComfyUI's folder_paths).

- adapters: ComfyUI/models/dreamcache and the pack's own models/ folder
- caches:   ComfyUI/models/dreamcache_caches and ComfyUI/output/dreamcache (where Save DreamCache writes)
- SAM:      ComfyUI/models/sams

The nodes and the command-line runners register the same folders (``register_model_folders``), so a file name
means the same file in a workflow and on the command line.
"""
import os

PACK_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")
CHECKPOINT_FOLDER = "checkpoints"
ADAPTER_FOLDER = "dreamcache"
CACHE_FOLDER = "dreamcache_caches"
CACHE_OUTPUT_SUBFOLDER = "dreamcache"
SAM_FOLDER = "sams"
ADAPTER_EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin"}
SAM_FILE_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".sft")


def _register(folder_paths, name, paths, extensions):
    for path in paths:
        folder_paths.add_model_folder_path(name, path)
    known_paths, known_extensions = folder_paths.folder_names_and_paths[name]
    folder_paths.folder_names_and_paths[name] = (known_paths, set(known_extensions) | set(extensions))


def register_model_folders():
    """Idempotent: ComfyUI's add_model_folder_path skips paths it already has."""
    import folder_paths

    _register(folder_paths, ADAPTER_FOLDER, [os.path.join(folder_paths.models_dir, ADAPTER_FOLDER), PACK_MODELS_DIR],
              ADAPTER_EXTENSIONS)
    _register(folder_paths, CACHE_FOLDER, [os.path.join(folder_paths.models_dir, CACHE_FOLDER),
                                           os.path.join(folder_paths.get_output_directory(), CACHE_OUTPUT_SUBFOLDER)],
              {".safetensors"})
    _register(folder_paths, SAM_FOLDER, [os.path.join(folder_paths.models_dir, SAM_FOLDER)], set(SAM_FILE_EXTENSIONS))
