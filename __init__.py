"""ComfyUI-DreamCache: finetuning-free subject personalisation (DreamCache, CVPR 2025) for ComfyUI.

ComfyUI imports this file from custom_nodes/; it only registers the nodes, the V3 way: ComfyUI calls
``comfy_entrypoint`` and registers every node the extension lists under its schema's node id.
"""
from comfy_api.v0_0_2 import ComfyExtension

from .nodes import NODES


class DreamCacheExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> DreamCacheExtension:
    return DreamCacheExtension()


__all__ = ["comfy_entrypoint"]
