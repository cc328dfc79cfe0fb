"""Load DreamCache Adapter: a trained adapter file -> DREAMCACHE_ADAPTER."""
import folder_paths
from comfy_api.v0_0_2 import io

from ..dreamcache_core.io.adapter_io import load_adapter
from .io_types import CATEGORY_LOADERS, Adapter
from .model_folders import ADAPTER_FOLDER


class DreamCacheAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheAdapterLoader",
            display_name="Load DreamCache Adapter",
            category=CATEGORY_LOADERS,
            description="Loads the trained DreamCache conditioning adapters (about 25M parameters for SD1.5/SD2.x).",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                               tooltip="The DreamCache adapter: a .safetensors from this pack's training script or "
                                       "converter, or the authors' cross_attention-<step>.pt (read with weights_only). "
                                       "Files are listed from ComfyUI/models/dreamcache and the pack's models/ folder."),
            ],
            outputs=[Adapter.Output(display_name="adapter",
                                    tooltip="The conditioning adapters of the memory layers, for Apply DreamCache.")],
        )

    @classmethod
    def execute(cls, adapter_name):
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name)
        return io.NodeOutput(load_adapter(path))


NODES = [DreamCacheAdapterLoader]
