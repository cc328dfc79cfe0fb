"""The node contract: the pack's node ids, inputs and outputs, the one list every test reads.

Saved workflows reference these node ids and inputs, so they must never change: node id -> (required inputs in
order, name -> type, "COMBO" for a list of choices; optional inputs; output types in order).
"""
CATEGORY = "DreamCache"

NODE_CONTRACT = {
    "DreamCacheAdapterLoader": ({"adapter_name": "COMBO"}, set(), ["DREAMCACHE_ADAPTER", "STRING"]),
    "DreamCacheSAMLoader": ({"model_name": "COMBO", "device": "COMBO"}, set(), ["SAM_MODEL"]),
    "DreamCacheMaskReference": ({"image": "IMAGE", "size": "INT"}, {"sam_model", "mask"}, ["IMAGE", "MASK"]),
    "DreamCacheEncode": ({"model": "MODEL", "reference": "LATENT", "conditioning": "CONDITIONING", "seed": "INT"},
                         {"mask", "batch_size"}, ["DREAMCACHE"]),
    "DreamCacheApply": ({"model": "MODEL", "adapter": "DREAMCACHE_ADAPTER", "cache": "DREAMCACHE", "strength": "FLOAT",
                         "start_percent": "FLOAT", "end_percent": "FLOAT", "apply_to": "COMBO"},
                        {"attn_mask", "reference_mode", "reference_weights", "middle_weight", "decoder_weight",
                         "layer_weights", "negative_cache", "layer_preset", "weight_schedule", "frame_weights"},
                        ["MODEL"]),
    "DreamCacheSave": ({"cache": "DREAMCACHE", "filename_prefix": "STRING"}, set(), []),
    "DreamCacheLoad": ({"cache_name": "COMBO"}, set(), ["DREAMCACHE"]),
    # combined guidance and several references
    "DreamCacheGuider": ({"model": "MODEL", "adapter": "DREAMCACHE_ADAPTER", "cache": "DREAMCACHE",
                          "positive": "CONDITIONING", "negative": "CONDITIONING", "text_cfg": "FLOAT",
                          "image_cfg": "FLOAT"}, {"attn_mask", "reference_mode", "reference_weights", "negative_cache",
                                                  "layer_preset", "frame_weights"}, ["GUIDER"]),
    "DreamCacheCombine": ({"cache_1": "DREAMCACHE", "cache_2": "DREAMCACHE", "weight_1": "FLOAT", "weight_2": "FLOAT"},
                          {"cache_3", "cache_4", "weight_3", "weight_4", "mode"}, ["DREAMCACHE", "DREAMCACHE"]),
    # the negative reference's noise
    "DreamCacheReferenceNoise": ({"image": "IMAGE", "mode": "COMBO", "strength": "FLOAT", "seed": "INT"}, {"mask"},
                                 ["IMAGE"]),
}
NODE_IDS = frozenset(NODE_CONTRACT)


def in_pack_category(category: str) -> bool:
    """The pack's menu: "DreamCache" or one of its sub-categories ("DreamCache/loaders", ...)."""
    return category == CATEGORY or category.startswith(CATEGORY + "/")
