"""Encode DreamCache: one U-Net pass at t = 1 on the reference -> DREAMCACHE."""
import comfy.utils
from comfy_api.v0_0_2 import io

from ..dreamcache_core.comfy_bridge import encode_reference
from .io_types import CATEGORY_REFERENCE, Cache
from .widget_checks import check_number_inputs

DEFAULT_BATCH_SIZE = 16  # references per pass: typical batches are one pass, bit for bit as before


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
                                                     "subject on white from Mask Reference). ALL references of a "
                                                     "batch form one shared memory (or one per image with Apply's "
                                                     "'one reference per image')."),
                io.Conditioning.Input("conditioning", tooltip="Text context of the caching pass: one without the "
                                                              "subject, typically the empty or the negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the small noise added at t = 1. Set 'control after generate' to fixed "
                                     "so the reference is encoded once, not on every run."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Subject mask (1 = subject) of the reference, any resolution with the "
                                      "reference's aspect; background tokens are left out of the memory."),
                io.Int.Input("batch_size", default=DEFAULT_BATCH_SIZE, min=1, max=4096, optional=True,
                             tooltip="References per U-Net pass: a longer batch (the frames of an animation) is "
                                     "encoded in passes of this many, so memory stays bounded, with a progress bar. "
                                     "Each reference gets the noise it would get in one pass; a batch split into "
                                     "passes matches one pass to rounding, not bit for bit."),
            ],
            outputs=[Cache.Output(display_name="cache", tooltip="The cached memory-layer features of the reference, "
                                                                "for Apply DreamCache or Save DreamCache.")],
        )

    @classmethod
    def execute(cls, model, reference, conditioning, seed, mask=None, batch_size=DEFAULT_BATCH_SIZE):
        """Up to ``batch_size`` references per U-Net pass, the progress bar advanced after each pass. A batch that
        fits one pass is bit-identical to encoding it whole; split into passes it differs at the U-Net kernels'
        rounding for another batch size (measured on the CPU: up to 4e-3 on fp16 features)."""
        check_number_inputs(cls, {"seed": seed, "batch_size": batch_size})  # linked numbers skip queue checks
        references = reference["samples"]
        progress = comfy.utils.ProgressBar(max(1, len(references)))
        cache = encode_reference(model, references, conditioning, seed, mask, batch_size,
                                 on_pass=lambda done, total: progress.update_absolute(done, total))
        return io.NodeOutput(cache)


NODES = [DreamCacheEncode]
