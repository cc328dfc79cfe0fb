"""Load DreamCache Adapter: a trained adapter file -> DREAMCACHE_ADAPTER, and a few lines saying what it is for."""
import folder_paths
from comfy_api.v0_0_2 import io

from ..dreamcache_core.io.adapter_io import load_adapter
from ..dreamcache_core.io.adapter_sources import missing_adapter_message
from ..dreamcache_core.method.base_family import describe_adapter
from .io_types import CATEGORY_LOADERS, Adapter
from .model_folders import ADAPTER_FOLDER


class DreamCacheAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheAdapterLoader",
            display_name="Load DreamCache Adapter",
            category=CATEGORY_LOADERS,
            description="Loads the trained DreamCache conditioning adapters (about 25M parameters for SD1.5/SD2.x) "
                        "and says which base model (SD1.5, SD2.x or SDXL) they were trained for.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                               tooltip="The DreamCache adapter: the authors' SD2.1-base cross_attention-<step>.pt "
                                       "(the only released one, linked from github.com/Emanuele97x/DreamCache; read "
                                       "with weights_only), or a .safetensors from this pack's training script or "
                                       "converter (SD1.5, SDXL). Files are listed from ComfyUI/models/dreamcache and "
                                       "the pack's models/ folder."),
            ],
            outputs=[
                Adapter.Output(display_name="adapter",
                               tooltip="The conditioning adapters of the memory layers, for Apply DreamCache."),
                io.String.Output(display_name="info",
                                 tooltip="What the adapter is for: its base model family (SD1.5, SD2.x, SDXL), text "
                                         "width, memory layers (ComfyUI block names) and their widths, parameter "
                                         "count, and whether it is an authors' checkpoint whose norms are folded "
                                         "when applied. Show it with a text display node; sample with a checkpoint "
                                         "of that family."),
            ],
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None):
        """Checked when the prompt is queued: a name that is not in the adapter folders (an empty folder, a
        workflow naming another file) is refused with where adapters come from and where the file goes."""
        if adapter_name is None or adapter_name in folder_paths.get_filename_list(ADAPTER_FOLDER):
            return True
        return missing_adapter_text(adapter_name)

    @classmethod
    def execute(cls, adapter_name):
        path = folder_paths.get_full_path(ADAPTER_FOLDER, adapter_name)
        if path is None:
            raise FileNotFoundError(missing_adapter_text(adapter_name))
        adapter = load_adapter(path)
        return io.NodeOutput(adapter, describe_adapter(adapter))


def missing_adapter_text(adapter_name) -> str:
    """Where the loader looked for ``adapter_name``, what is there, and where adapters come from."""
    return missing_adapter_message(str(adapter_name), folder_paths.get_folder_paths(ADAPTER_FOLDER),
                                   folder_paths.get_filename_list(ADAPTER_FOLDER))


NODES = [DreamCacheAdapterLoader]
