"""Combine DreamCache: the references of two caches as one cache (the union of their memory tokens)."""
from ..dreamcache_core.cache import combine_caches


class DreamCacheCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cache_1": ("DREAMCACHE", {"tooltip": "First cache (one or several references)."}),
                "cache_2": ("DREAMCACHE", {"tooltip": "Second cache, encoded with the same model."}),
                "weight_1": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Relative weight of cache_1's references (shared among them)."}),
                "weight_2": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Relative weight of cache_2's references (shared among them)."}),
            }
        }

    RETURN_TYPES = ("DREAMCACHE",)
    OUTPUT_TOOLTIPS = ("One cache holding every reference of both, in order (cache_1's first), with their weights.",)
    FUNCTION = "combine"
    CATEGORY = "DreamCache"
    DESCRIPTION = ("Joins two caches: with 'all references shared' the memory keys and values are the union of both "
                   "caches' subject tokens, each reference's keys biased by log(weight) so it gets that share of "
                   "attention (one image combined with itself at any weights gives the same result as once); with "
                   "'one reference per image' image i uses reference i. Chain Combine nodes for more references.")

    def combine(self, cache_1, cache_2, weight_1, weight_2):
        return (combine_caches([cache_1, cache_2], [weight_1, weight_2]),)


NODE_CLASS_MAPPINGS = {"DreamCacheCombine": DreamCacheCombine}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheCombine": "Combine DreamCache"}
