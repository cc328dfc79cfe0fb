"""Apply DreamCache: patch a clone of MODEL with the adapters and a cache."""
from ..dreamcache_core.adapter import adapter_for_model
from ..dreamcache_core.cache import check_cache_fits
from ..dreamcache_core.comfy_bridge import comfy_memory_attention
from ..dreamcache_core.layers import discover_memory_layers, model_signature
from ..dreamcache_core.patch import POSITIVE_CHUNK, DreamCacheInjection, attach_injection

APPLY_TO_CHUNKS = {"positive only": (POSITIVE_CHUNK,), "positive and negative": None}


def sigma_range(model, start_percent, end_percent):
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); both lie in 0..1.")
    model_sampling = model.get_model_object("model_sampling")
    sigma_start = float("inf") if start_percent <= 0.0 else float(model_sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(model_sampling.percent_to_sigma(end_percent))
    return sigma_start, sigma_end


class DreamCacheApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to personalise. It is cloned: the input MODEL stays "
                                               "unpatched for other samplers."}),
                "adapter": ("DREAMCACHE_ADAPTER", {"tooltip": "Adapters trained for this base model."}),
                "cache": ("DREAMCACHE", {"tooltip": "The reference cache from Encode DreamCache (same base model)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                       "tooltip": "How much of the adapter's change to keep; 0 returns exactly the "
                                                  "input model."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Sampling progress at which personalisation starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Sampling progress at which personalisation stops."}),
                "apply_to": (list(APPLY_TO_CHUNKS), {"default": "positive only",
                                                     "tooltip": "'positive only' injects the reference into the "
                                                                "positive batch only (the paper's joint guidance); "
                                                                "'positive and negative' into both."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A personalised clone of the model, for the stock KSampler.",)
    FUNCTION = "apply"
    CATEGORY = "DreamCache"
    DESCRIPTION = ("Injects the cached reference into the memory layers' self-attention through the trained "
                   "adapters. Sample with the returned MODEL; use the input MODEL for unpersonalised samples.")

    def apply(self, model, adapter, cache, strength, start_percent, end_percent, apply_to):
        if strength == 0:
            return (model,)
        unet = model.get_model_object("diffusion_model")
        ready_adapter = adapter_for_model(adapter, unet)
        check_cache_fits(cache, discover_memory_layers(unet), model_signature(unet))
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        if apply_to not in APPLY_TO_CHUNKS:
            raise ValueError(f"apply_to must be one of {list(APPLY_TO_CHUNKS)}, got {apply_to!r}.")
        injection = DreamCacheInjection(ready_adapter, cache, strength, sigma_start, sigma_end, APPLY_TO_CHUNKS[apply_to],
                                        attention=comfy_memory_attention)
        return (attach_injection(model.clone(), injection),)


NODE_CLASS_MAPPINGS = {"DreamCacheApply": DreamCacheApply}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheApply": "Apply DreamCache"}
