"""Combine DreamCache: the references of two to four caches as one memory (union or average), or a reference and
a negative reference (subtract)."""
from comfy_api.v0_0_2 import io

from ..dreamcache_core.method.cache import COMBINE_MODES, combine_caches_by_mode, reference_weight_values
from ..dreamcache_core.method.input_checks import COMBINE_WEIGHT_RANGE
from .io_types import CATEGORY_CACHE, Cache
from .widget_checks import check_number_inputs, choice_problem, text_problem, validation_result, widget_problems

CACHE_SLOTS = 4
MODE_TOOLTIP = ("What the combined memory is. 'union': the memory keys and values are every cache's subject tokens "
                "together, each cache's keys biased by log(weight) so it gets that share of attention (several "
                "subjects or several photos of one). 'average': reference i becomes the weighted mean of reference i "
                "of each cache, one reference's worth of tokens (aligned photos of the same subject at the same "
                "size). 'subtract': cache_1 is the reference and the other caches (their union, weighted) come out "
                "as negative_cache, for Apply DreamCache's or the DreamCache Guider's negative_cache: sampling steers "
                "away from them.")


def _weight_input(index):
    return io.Float.Input(f"weight_{index}", default=1.0, min=COMBINE_WEIGHT_RANGE[0], max=COMBINE_WEIGHT_RANGE[1],
                          step=0.01, optional=index > 2,
                          tooltip=f"Relative weight of cache_{index}'s references (shared among them).")


class DreamCacheCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheCombine",
            display_name="Combine DreamCache",
            category=CATEGORY_CACHE,
            description="Joins two to four caches (chain Combine nodes for more). In 'union' mode the memory keys and "
                        "values are the union of every cache's subject tokens, each reference's keys biased by "
                        "log(weight) so it gets that share of attention (one image combined with itself at any "
                        "weights gives the same result as once); with Apply's 'one reference per image' image i uses "
                        "reference i. 'average' averages aligned references; 'subtract' makes the caches after the "
                        "first a negative reference.",
            inputs=[
                Cache.Input("cache_1", tooltip="First cache (one or several references)."),
                Cache.Input("cache_2", tooltip="Second cache, encoded with the same model."),
                _weight_input(1),
                _weight_input(2),
                Cache.Input("cache_3", optional=True, tooltip="Optional third cache (same model)."),
                Cache.Input("cache_4", optional=True, tooltip="Optional fourth cache (same model)."),
                _weight_input(3),
                _weight_input(4),
                io.Combo.Input("mode", options=list(COMBINE_MODES), default="union", optional=True,
                               tooltip=MODE_TOOLTIP),
            ],
            outputs=[
                Cache.Output(display_name="cache", tooltip="union: every reference of every cache, in order "
                                                           "(cache_1's first), with their weights; average: the "
                                                           "averaged references; subtract: cache_1."),
                Cache.Output(display_name="negative_cache",
                             tooltip="subtract: the caches after the first, for a negative_cache input. Empty (no "
                                     "negative reference) in the other modes."),
            ],
        )

    @classmethod
    def validate_inputs(cls, weight_1=None, weight_2=None, weight_3=None, weight_4=None, mode=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"weight_1": weight_1, "weight_2": weight_2, "weight_3": weight_3,
                                         "weight_4": weight_4})
        if not problems and weight_1 is not None and weight_2 is not None:
            problems.append(text_problem(reference_weight_values, [weight_1, weight_2], "weight_1, weight_2"))
        problems.append(choice_problem(mode, COMBINE_MODES, "mode"))
        return validation_result(problems)

    @classmethod
    def execute(cls, cache_1, cache_2, weight_1, weight_2, cache_3=None, cache_4=None, weight_3=1.0, weight_4=1.0,
                mode="union"):
        given = [(cache, weight, index) for index, (cache, weight) in
                 enumerate(zip((cache_1, cache_2, cache_3, cache_4), (weight_1, weight_2, weight_3, weight_4)), 1)
                 if cache is not None]
        check_number_inputs(cls, {f"weight_{index}": weight for _, weight, index in given})
        caches = [cache for cache, _, _ in given]
        weights = [float(weight) for _, weight, _ in given]
        return io.NodeOutput(*combine_caches_by_mode(caches, weights, mode))


NODES = [DreamCacheCombine]
