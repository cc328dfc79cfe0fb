"""The pack's own V3 socket types (comfy_api v0.0.2) and its menu categories."""
from comfy_api.v0_0_2 import io

Adapter = io.Custom("DREAMCACHE_ADAPTER")
Cache = io.Custom("DREAMCACHE")
SamModel = io.Custom("SAM_MODEL")

CATEGORY_LOADERS = "DreamCache/loaders"
CATEGORY_REFERENCE = "DreamCache/reference"
CATEGORY_SAMPLING = "DreamCache/sampling"
CATEGORY_CACHE = "DreamCache/cache"
