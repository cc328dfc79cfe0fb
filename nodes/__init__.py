"""ComfyUI glue of DreamCache: every node module's mappings, merged."""
from . import adapter_loader, apply, cache_files, combine, encode, guider, mask_reference, sam_loader
from .model_folders import register_model_folders

register_model_folders()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (mask_reference, sam_loader, encode, adapter_loader, apply, cache_files, combine, guider):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
