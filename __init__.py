"""ComfyUI-DreamCache: finetuning-free subject personalisation (DreamCache, CVPR 2025) for ComfyUI.

ComfyUI imports this file from custom_nodes/; it only registers the nodes.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
