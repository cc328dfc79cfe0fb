"""Combine DreamCache: the references of two caches as one cache (the union of their memory tokens)."""
from comfy_api.v0_0_2 import io

from ..dreamcache_core.method.cache import combine_caches, reference_weight_values
from ..dreamcache_core.method.input_checks import check_number
from .io_types import CATEGORY_CACHE, Cache
from .widget_checks import text_problem, validation_result, widget_problems


class DreamCacheCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheCombine",
            display_name="Combine DreamCache",
            category=CATEGORY_CACHE,
            description="Joins two caches: with 'all references shared' the memory keys and values are the union of "
                        "both caches' subject tokens, each reference's keys biased by log(weight) so it gets that "
                        "share of attention (one image combined with itself at any weights gives the same result as "
                        "once); with 'one reference per image' image i uses reference i. Chain Combine nodes for more "
                        "references.",
            inputs=[
                Cache.Input("cache_1", tooltip="First cache (one or several references)."),
                Cache.Input("cache_2", tooltip="Second cache, encoded with the same model."),
                io.Float.Input("weight_1", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Relative weight of cache_1's references (shared among them)."),
                io.Float.Input("weight_2", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Relative weight of cache_2's references (shared among them)."),
            ],
            outputs=[Cache.Output(display_name="cache", tooltip="One cache holding every reference of both, in order "
                                                                "(cache_1's first), with their weights.")],
        )

    @classmethod
    def validate_inputs(cls, weight_1=None, weight_2=None):
        """Checked when the prompt is queued (widget values only; linked inputs are checked when the node runs)."""
        problems = widget_problems(cls, {"weight_1": weight_1, "weight_2": weight_2})
        if not problems and weight_1 is not None and weight_2 is not None:
            problems.append(text_problem(reference_weight_values, [weight_1, weight_2], "weight_1, weight_2"))
        return validation_result(problems)

    @classmethod
    def execute(cls, cache_1, cache_2, weight_1, weight_2):
        weights = [check_number(weight_1, "weight_1"), check_number(weight_2, "weight_2")]
        return io.NodeOutput(combine_caches([cache_1, cache_2], weights))


NODES = [DreamCacheCombine]
