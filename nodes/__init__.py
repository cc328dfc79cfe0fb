"""ComfyUI glue of DreamCache: every node (V3 schema, comfy_api v0.0.2) of the pack, in menu order.

``NODES`` is what the pack's ComfyExtension hands to ComfyUI; ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS`` are the same nodes keyed by node id, read from their schemas.
"""
from . import adapter_loader, apply, cache_files, combine, encode, guider, mask_reference, reference_noise, sam_loader
from .model_folders import register_model_folders

register_model_folders()

NODES = [node for module in (mask_reference, reference_noise, sam_loader, encode, adapter_loader, apply, cache_files, combine, guider)
         for node in module.NODES]
_SCHEMAS = [node.define_schema() for node in NODES]
NODE_CLASS_MAPPINGS = {schema.node_id: node for schema, node in zip(_SCHEMAS, NODES)}
NODE_DISPLAY_NAME_MAPPINGS = {schema.node_id: schema.display_name for schema in _SCHEMAS}
