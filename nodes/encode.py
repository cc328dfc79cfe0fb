"""Encode DreamCache: one U-Net pass at t = 1 on the reference -> DREAMCACHE."""
import comfy.utils
from comfy_api.v0_0_2 import io

from ..dreamcache_core.comfy_bridge import encode_reference
from .io_types import CATEGORY_REFERENCE, Cache


class DreamCacheEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheEncode",
            display_name="Encode DreamCache",
            category=CATEGORY_REFERENCE,
            description="Runs the model once on the reference at timestep t = 1 and caches the features entering the "
                        "memory layers (middle + every second decoder transformer). This is DreamCache's only extra "
                        "U-Net pass.",
            inputs=[
                io.Model.Input("model", tooltip="The model you will sample with (LoRAs and patches on it are "
                                                "honoured). Connect it before Apply DreamCache: the pass runs without "
                                                "any adapter."),
                io.Latent.Input("reference", tooltip="The reference image encoded with this model's VAE (ideally the "
                                                     "subject on white from Mask Reference). A batch of several "
                                                     "references is encoded in one pass and ALL of them form one "
                                                     "shared memory."),
                io.Conditioning.Input("conditioning", tooltip="Text context of the caching pass: one without the "
                                                              "subject, typically the empty or the negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the small noise added at t = 1. Set 'control after generate' to fixed "
                                     "so the reference is encoded once, not on every run."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Subject mask (1 = subject) of the reference, any resolution with the "
                                      "reference's aspect; background tokens are left out of the memory."),
            ],
            outputs=[Cache.Output(display_name="cache", tooltip="The cached memory-layer features of the reference, "
                                                                "for Apply DreamCache or Save DreamCache.")],
        )

    @classmethod
    def execute(cls, model, reference, conditioning, seed, mask=None):
        """All references in one U-Net pass, the progress bar filled once when it ends: encoding in chunks of a few
        references is not bit-identical to one pass (the U-Net's kernels round differently per batch size; measured
        on the CPU, up to 4e-3 on fp16 features), so the cache would depend on how the batch was split."""
        references = reference["samples"]
        progress = comfy.utils.ProgressBar(max(1, len(references)))
        cache = encode_reference(model, references, conditioning, seed, mask)
        progress.update_absolute(progress.total)
        return io.NodeOutput(cache)


NODES = [DreamCacheEncode]
