"""Combine DreamCache: the references of two caches as one cache (the union of their memory tokens)."""
from ..dreamcache_core.cache import combine_caches, reference_weight_values
from ..dreamcache_core.input_checks import check_number
from .widget_checks import text_problem, validation_result, widget_problems


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

    @classmethod
    def VALIDATE_INPUTS(cls, weight_1=None, weight_2=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"weight_1": weight_1, "weight_2": weight_2})
        if not problems and weight_1 is not None and weight_2 is not None:
            problems.append(text_problem(reference_weight_values, [weight_1, weight_2], "weight_1, weight_2"))
        return validation_result(problems)

    RETURN_TYPES = ("DREAMCACHE",)
    OUTPUT_TOOLTIPS = ("One cache holding every reference of both, in order (cache_1's first), with their weights.",)
    FUNCTION = "combine"
    CATEGORY = "DreamCache"
    DESCRIPTION = ("Joins two caches: with 'all references shared' the memory keys and values are the union of both "
                   "caches' subject tokens, each reference's keys biased by log(weight) so it gets that share of "
                   "attention (one image combined with itself at any weights gives the same result as once); with "
                   "'one reference per image' image i uses reference i. Chain Combine nodes for more references.")

    def combine(self, cache_1, cache_2, weight_1, weight_2):
        weights = [check_number(weight_1, "weight_1"), check_number(weight_2, "weight_2")]
        return (combine_caches([cache_1, cache_2], weights),)


NODE_CLASS_MAPPINGS = {"DreamCacheCombine": DreamCacheCombine}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheCombine": "Combine DreamCache"}
