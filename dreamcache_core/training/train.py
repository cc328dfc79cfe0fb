"""Train DreamCache adapters.

    python -m dreamcache_core.training.train --checkpoint sd15.safetensors --data data/manifest.jsonl --output-dir runs/a
    python -m dreamcache_core.training.train --checkpoint sd15.safetensors --data data/manifest.jsonl \\
        --precompute data/precomputed --precompute-caches --precompute-only      # then train with --data data/precomputed
    torchrun --nproc_per_node 4 -m dreamcache_core.training.train ...                     # several GPUs (DDP over the adapter)

Run it from the pack folder. ComfyUI comes from --comfyui, $COMFYUI_PATH, or
the ComfyUI holding custom_nodes/<this pack>. --checkpoint and --init-adapter
take a path or a file name in ComfyUI's model folders. The final adapter is
written to --output-dir; --install-as NAME.safetensors also copies it into
ComfyUI's models/dreamcache (refused before training if that file exists,
unless --overwrite-installed).

What a step does (see training_loss / training_loop): each sample's reference
is cached at t = 1 by ``comfy_bridge.encode_reference`` (the Encode node's code,
no gradients), the target latent is noised at a random t, and the base model
predicts it through ComfyUI's sampling code with the adapter injected by the
patch callables Apply DreamCache uses. The loss is the base model's own
denoising loss (epsilon or v, taken from the loaded model). Only the adapter
trains; captions are replaced by the empty prompt with --caption-dropout and
references by a white one with --reference-dropout.

The run writes train_log.csv and TensorBoard event files (tensorboard/:
loss overall and per timestep band, grad norm, lr, samples/s, peak memory);
with --validation-data and --validation-every N it writes, every N steps, a
grid of samples with and without the adapter (validation/step-N.png, also in
TensorBoard) and the held-out matched-vs-shuffled reference gap
(reference_gap.csv; see training.validation).

--data is a JSONL manifest (see training_manifest; build one with
``python -m dreamcache_core.training.dataset``), or a sharded one (``python -m
dreamcache_core.training.synthesize``'s folder, read shard by shard), the authors'
released layout (object folders of <stem>_generation.png, _caption.txt, _mask.png),
or Subjects200K as prepared by ``python -m dreamcache_core.training.prepare_subjects200k``,
encoded on the fly with the checkpoint's VAE and text encoder, or a folder written
by --precompute; the kind is told from the path (data_formats, --data-format).
--augment authors augments each reference as the authors trained (reference_augmentation;
the default for the authors' layout and Subjects200K).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..io.prompt_files import read_prompts_file
from .data_formats import AUGMENTED_BY_DEFAULT, DATA_FORMATS, detect_data_format, open_manifest
from .reference_augmentation import AUGMENT_MODES, AuthorsAugmentation, augmentation_settings
from .toy_encoders import ToyImageEncoder, ToyTextEncoder
from .training_loop import OPTIMIZERS, DistributedInfo, TrainConfig, AdapterTrainer, latest_checkpoint
from ..comfy_bridge import ensure_comfyui
from ..comfy_bridge.model_files import adapter_install_target, install_adapter, resolve_model_file
from ..comfy_bridge.models import DTYPES, model_from_unet_config, read_unet_config, load_checkpoint
from ..io.adapter_io import load_adapter
from ..method.adapter import build_adapter
from ..method.layers import discover_memory_layers, model_signature
from .precomputed_store import PrecomputedStore
from .training_sources import (ComfyImageEncoder, ComfyTextEncoder, ManifestSource, StoreSource, ComfyImageDecoder,
                               precompute)
from .validation import ValidationSettings, Validator

DEFAULT_AUGMENT_VARIANTS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("base model")
    g.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or the one holding custom_nodes)")
    g.add_argument("--checkpoint", help="SD1.x / SD2.x / SDXL checkpoint, loaded by ComfyUI's loader: a path, or a "
                                        "file name in ComfyUI's models/checkpoints")
    g.add_argument("--unet-config", help="JSON ComfyUI unet config (tests, toy models) instead of --checkpoint")
    g.add_argument("--unet-weights", help=".safetensors of the U-Net built from --unet-config")
    g.add_argument("--prediction", choices=["eps", "v"], help="with --unet-config (default: the JSON's, else eps)")
    g.add_argument("--unet-dtype", default="auto", help="auto (ComfyUI's choice) | fp32 | fp16 | bf16")
    g.add_argument("--cpu", action="store_true", help="run on the CPU")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="manifest .jsonl, a sharded folder (or its index.json) written by dreamcache_core.training."
                        "synthesize, an authors'-layout folder, a folder written by prepare_subjects200k, or one "
                        "written by --precompute")
    g.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                   help="what --data is (default: told from the path)")
    g.add_argument("--augment", choices=AUGMENT_MODES,
                   help="reference augmentation: authors (white background, crop, random resize >= 70%%, flip, "
                        "jitter, erase; the default for the authors' layout and Subjects200K) or none (the default "
                        "for manifests and synthesis folders)")
    g.add_argument("--augment-variants", type=int, metavar="K",
                   help="with --precompute and augmentation: augmented references stored per sample, one drawn per "
                        f"step (default {DEFAULT_AUGMENT_VARIANTS}; K times the reference storage and encoding time)")
    g.add_argument("--min-quality", type=float,
                   help="Subjects200K: the quality bar on all three scores (set by prepare_subjects200k, default 5; "
                        "a prepared folder is checked against it)")
    g.add_argument("--resolution", type=int, default=512, help="training image size (shorter side, centre crop)")
    g.add_argument("--reference-resolution", type=int, help="reference size (default: --resolution)")
    g.add_argument("--no-masks", action="store_true", help="ignore reference masks (cache every reference token)")
    g.add_argument("--toy-encoders", action="store_true",
                   help="encode a manifest with the toy world's fixed encoders instead of a VAE/CLIP (tests, benchmarks)")
    g.add_argument("--precompute", metavar="DIR", help="precompute latents and text embeddings into DIR, then train from it")
    g.add_argument("--precompute-caches", action="store_true", help="also precompute each reference's cache")
    g.add_argument("--precompute-only", action="store_true", help="stop after --precompute")
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default="dreamcache_training",
                   help="where checkpoints, train_log.csv and the final dreamcache_adapter.safetensors are written")
    g.add_argument("--install-as", metavar="NAME.safetensors",
                   help="also copy the final adapter into ComfyUI's models/dreamcache as NAME.safetensors (checked "
                        "before training: refused if that file exists, unless --overwrite-installed)")
    g.add_argument("--overwrite-installed", action="store_true", help="let --install-as replace an existing file")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=4, help="samples per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-5,
                   help="learning rate (authors, AdamW: 1e-5; Adafactor's is relative, see --optimizer)")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                   help="adamw (the authors'; 8 bytes of state per adapter parameter) or adafactor (next to no "
                        "state; a relative step, so its lr is not AdamW's: see training_loop.make_optimizer)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    g.add_argument("--caption-dropout", type=float,
                   help="share of captions replaced by the empty one (default 0.05; 0.07 with --augment authors, "
                        "the authors' empty-caption rate)")
    g.add_argument("--reference-dropout", type=float, default=0.05)
    g.add_argument("--timestep-range", type=int, nargs=2, default=(0, 999), metavar=("LOW", "HIGH"))
    g.add_argument("--seed", type=int, default=0, help="seeds the adapter's initialisation and every draw")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 or fp16 on CUDA, none on the CPU)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--resume", help="checkpoint adapter (with its .state.pt) to continue exactly, or 'auto'")
    g.add_argument("--init-adapter", help="start from this adapter's weights (fresh optimizer): a path, or a file "
                                          "name in ComfyUI's models/dreamcache")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard event files")
    g = p.add_argument_group("validation")
    g.add_argument("--validation-data", help="held-out data, any format --data reads; its first --validation-count "
                                             "samples are the fixed validation set")
    g.add_argument("--validation-every", type=int, default=0,
                   help="every N steps: a validation grid PNG and the held-out reference gap (0 = off)")
    g.add_argument("--validation-count", type=int, default=4, help="held-out samples (at least 2 for the gap)")
    g.add_argument("--validation-prompts", help="text file, one prompt per line, each sampled for every held-out "
                                                "reference (default: each sample's own caption)")
    g.add_argument("--validation-steps", type=int, default=20, help="sampling steps of the grid (euler)")
    g.add_argument("--validation-cfg", type=float, default=7.5, help="guidance scale of the grid (joint guidance)")
    return p


def setup_distributed(cpu: bool) -> DistributedInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def load_model(args):
    """(model_patcher, clip or None, vae or None)."""
    if bool(args.checkpoint) == bool(args.unet_config):
        raise ValueError("Give exactly one of --checkpoint (a real model) and --unet-config (a test/toy U-Net).")
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, args.unet_dtype)

    unet_config, prediction = read_unet_config(args.unet_config)
    dtype = DTYPES.get(args.unet_dtype, torch.float32)
    model = model_from_unet_config(unet_config, args.prediction or prediction, args.unet_weights, dtype)
    return model, None, None


def make_source(args, clip, vae, log=print):
    """(source, manifest or None); also settles ``args.augment`` and ``args.caption_dropout`` for the data."""
    use_masks = not args.no_masks
    data_format = detect_data_format(args.data) if args.data_format == "auto" else args.data_format
    if data_format == "store":
        if not PrecomputedStore.is_store(args.data):
            raise ValueError(f"--data {args.data} is not a precomputed store (no store.json); pass the manifest "
                             ".jsonl or a folder written by --precompute.")
        source = StoreSource(PrecomputedStore(args.data), use_masks)
        made_from = source.store.info.get("source")
        augmented = isinstance(made_from, dict) and made_from.get("augment") == "authors"
        if args.augment == "authors" and not augmented:
            log("note: --augment authors does nothing for a store precomputed without augmentation; precompute "
                "it again with --augment authors")
        settle_caption_dropout(args, augmented)
        return source, None
    if args.augment is None:
        args.augment = "authors" if data_format in AUGMENTED_BY_DEFAULT else "none"
    settle_caption_dropout(args, args.augment == "authors")
    manifest = open_manifest(args.data, data_format, args.min_quality, log)
    if args.toy_encoders:
        image_encoder, text_encoder = ToyImageEncoder(), ToyTextEncoder()
    else:
        if vae is None or clip is None:
            raise ValueError("Encoding a manifest needs the checkpoint's VAE and text encoder: pass --checkpoint, or "
                             "--data a precomputed folder (or --toy-encoders for toy data).")
        image_encoder, text_encoder = ComfyImageEncoder(vae), ComfyTextEncoder(clip)
    augment = augmentation_settings(args.augment)
    if augment is not None and args.caption_dropout != AuthorsAugmentation.empty_caption_p:
        log(f"note: --augment authors with --caption-dropout {args.caption_dropout} (the authors used "
            f"{AuthorsAugmentation.empty_caption_p})")
    return ManifestSource(manifest, image_encoder, text_encoder, args.resolution, args.reference_resolution,
                          use_masks, augment, cut_out=data_format == "authors", log=log), manifest


def settle_caption_dropout(args, augmented: bool) -> None:
    if args.caption_dropout is None:
        args.caption_dropout = AuthorsAugmentation.empty_caption_p if augmented else 0.05


def augment_variants(args, source) -> int:
    if args.augment_variants is not None:
        return args.augment_variants
    return DEFAULT_AUGMENT_VARIANTS if getattr(source, "augment", None) is not None else 1


def report_skips(source, log) -> None:
    report = getattr(source, "skip_report", lambda: "")()
    if report:
        log(report)


def make_validator(args, model, clip, vae, log):
    """The ``validation.Validator`` of --validation-data (None when --validation-every is 0)."""
    if args.validation_every < 0:
        raise ValueError("--validation-every must be 0 (off) or a number of steps.")
    if not args.validation_every:
        if args.validation_data:
            log("note: --validation-data is unused without --validation-every N")
        return None
    if not args.validation_data:
        raise ValueError("--validation-every needs --validation-data (held-out samples in any --data format).")
    if args.validation_steps < 1:
        raise ValueError("--validation-steps must be at least 1.")

    # the held-out data's own format decides how its references are prepared (never augmented: fixed references)
    held_out_args = argparse.Namespace(**{**vars(args), "data": args.validation_data, "data_format": "auto",
                                          "augment": None})
    held_out, held_out_manifest = make_source(held_out_args, clip, vae, lambda message: None)
    if held_out_manifest is not None and held_out_manifest.skipped:
        log(held_out_manifest.report())
    prompts = None
    if args.validation_prompts:
        prompts = read_prompts_file(args.validation_prompts)
    if args.toy_encoders:
        decode, text_encoder = ToyImageEncoder().decode, ToyTextEncoder()
    else:
        decode = ComfyImageDecoder(vae) if vae is not None else None
        text_encoder = ComfyTextEncoder(clip) if clip is not None else None
    settings = ValidationSettings(every=args.validation_every, count=args.validation_count, prompts=prompts,
                                  steps=args.validation_steps, cfg=args.validation_cfg)
    return Validator(model, held_out, settings, decode, text_encoder, use_masks=not args.no_masks)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    distributed = setup_distributed(args.cpu)
    ensure_comfyui(args.comfyui, cpu=args.cpu)

    args.checkpoint = resolve_model_file(args.checkpoint, "checkpoint", args.comfyui)
    args.init_adapter = resolve_model_file(args.init_adapter, "adapter", args.comfyui)
    if args.install_as:  # refused now, not after hours of training
        adapter_install_target(args.install_as, args.overwrite_installed, args.comfyui)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    log = print if distributed.is_main else (lambda message: None)

    model, clip, vae = load_model(args)
    source, manifest = make_source(args, clip, vae, log)
    if manifest is not None and manifest.skipped:
        log(manifest.report())
    if args.augment_variants is not None and not args.precompute:
        raise ValueError("--augment-variants sets how many augmented references --precompute stores per sample; "
                         "without --precompute every draw is augmented afresh.")
    validator = make_validator(args, model, clip, vae, log) if distributed.is_main else None
    if args.precompute:
        precompute(source, args.precompute, model, args.precompute_caches, distributed.rank, distributed.world_size,
                   not args.no_progress, log, augment_variants(args, source))
        report_skips(source, log)
        if distributed.enabled:
            torch.distributed.barrier()
        if args.precompute_only:
            return 0
        source = StoreSource(PrecomputedStore(args.precompute), not args.no_masks)
    elif args.precompute_only:
        raise ValueError("--precompute-only needs --precompute DIR.")
    del clip, vae

    unet = model.model.diffusion_model
    adapter = build_adapter(discover_memory_layers(unet), model_signature(unet), seed=args.seed)
    if args.init_adapter:
        start = load_adapter(args.init_adapter, base_model=unet)
        adapter.load_state_dict(start.state_dict())
        log(f"starting from {args.init_adapter}")
    config = TrainConfig(
        output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps,
        caption_dropout=args.caption_dropout, reference_dropout=args.reference_dropout, seed=args.seed,
        timestep_range=tuple(args.timestep_range), mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, use_masks=not args.no_masks, save_every=args.save_every,
        log_every=args.log_every, progress=not args.no_progress, optimizer=args.optimizer,
        tensorboard=not args.no_tensorboard)
    trainer = AdapterTrainer(model, adapter, source, config, distributed, log=log, validator=validator)
    if validator is not None:
        validator.autocast = trainer.autocast()
    log(f"training {adapter.parameter_count():,} adapter parameters on {len(source)} samples "
        f"({model.model.model_type.name} prediction, device {trainer.device}, "
        f"autocast {trainer.autocast_dtype or 'off'}, {distributed.world_size} process(es))")
    resume = args.resume
    if resume == "auto":
        resume = latest_checkpoint(args.output_dir)
        if resume is None:
            log("no checkpoint to resume in the output folder; starting fresh")
    if resume:
        trainer.resume(resume)
    final = trainer.train()
    report_skips(source, log)
    if args.install_as and distributed.is_main and final:
        log(f"installed {install_adapter(final, args.install_as, args.overwrite_installed, args.comfyui)}")
    if distributed.enabled:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
