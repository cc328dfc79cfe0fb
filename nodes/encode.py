"""Encode DreamCache: one U-Net pass at t = 1 on the reference -> DREAMCACHE."""
from ..dreamcache_core.comfy_bridge import encode_reference


class DreamCacheEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model you will sample with (LoRAs and patches on it are honoured). "
                                               "Connect it before Apply DreamCache: the pass runs without any adapter."}),
                "reference": ("LATENT", {"tooltip": "The reference image encoded with this model's VAE (ideally the "
                                                    "subject on white from Mask Reference). A batch of several "
                                                    "references is encoded in one pass and ALL of them form one shared "
                                                    "memory."}),
                "conditioning": ("CONDITIONING", {"tooltip": "Text context of the caching pass: one without the "
                                                             "subject, typically the empty or the negative prompt."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                                 "tooltip": "Seed of the small noise added at t = 1. Set 'control after generate' "
                                            "to fixed so the reference is encoded once, not on every run."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Subject mask (1 = subject) of the reference, any resolution with the "
                                             "reference's aspect; background tokens are left out of the memory."}),
            },
        }

    RETURN_TYPES = ("DREAMCACHE",)
    OUTPUT_TOOLTIPS = ("The cached memory-layer features of the reference, for Apply DreamCache or Save DreamCache.",)
    FUNCTION = "encode"
    CATEGORY = "DreamCache"
    DESCRIPTION = ("Runs the model once on the reference at timestep t = 1 and caches the features entering the "
                   "memory layers (middle + every second decoder transformer). This is DreamCache's only extra U-Net pass.")

    def encode(self, model, reference, conditioning, seed, mask=None):
        return (encode_reference(model, reference["samples"], conditioning, seed, mask),)


NODE_CLASS_MAPPINGS = {"DreamCacheEncode": DreamCacheEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamCacheEncode": "Encode DreamCache"}
