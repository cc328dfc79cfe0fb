"""DreamCache in plain torch: memory layers, adapters, caches, patches, files.

ComfyUI is reached only through ``comfy_bridge`` (imported lazily).
"""
