"""Headless DreamCache generation through ComfyUI, in-process.

    python -m dreamcache_core.evaluation.generate --checkpoint sd15.safetensors --adapter dreamcache_sd15.safetensors \\
        --reference dog.jpg --sam sam_vit_b_01ec64.pth --prompt "a dog on the beach" --images-per-prompt 4 --out out/

    python -m dreamcache_core.evaluation.generate --checkpoint sd15.safetensors --adapter dreamcache_sd15.safetensors \\
        --dreambench /path/to/dreambooth/dataset --sam sam_vit_b_01ec64.pth --images-per-prompt 4 --out dreambench_out/

The same code a ComfyUI workflow runs: ``comfy.sd.load_checkpoint_guess_config``
(Load Checkpoint), CLIP Text Encode, VAE Encode / Decode, Encode DreamCache
(``comfy_bridge.encode_reference``), the Apply DreamCache injection, and the
stock KSampler path (``comfy.sample.sample``, what ``common_ksampler`` calls)
for joint guidance, or the DreamCache Guider (``comfy_bridge.combined_guider``)
for combined guidance.

Reference: an image (cut out onto a white square like the Mask Reference node,
with a mask file, the image's transparency or SAM; the mask also drops
background tokens from the memory, as Encode's mask input does), or a saved
cache (``--cache``).

Output: the images as PNG and ``settings.json`` holding every setting (the
resolved prompts, seeds, file hashes, versions) and one record per image.
``--replay out/settings.json --out again/`` regenerates the same images.

Noise: image n of a prompt uses ``prepare_noise(latent, seed_n)`` for a single
latent (as a KSampler with batch size 1 and that seed), so the batch size does
not change an image's starting noise. Ancestral/SDE samplers also draw noise
while sampling, for the whole batch from the batch's first seed: with them an
image depends on its batch too (recorded as ``batch_seeds``).

DreamBench (``--dreambench DATASET``, the google/dreambooth ``dataset``
folder): 30 subjects, the 25 prompts of the subject's kind (objects or live
subjects, shipped in ``dreamcache_core/data``), N images per prompt, one
reference per subject (``--reference-index``, default the first image in name
order), masked as the paper did (subject on white, background tokens dropped).
Prompts use the class noun without a unique token ("a dog in the jungle").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Callable, Optional

import torch

from ..comfy_bridge.pipeline import GUIDANCE_MODES, Pipeline, Sampler, load_pipeline
from ..io.file_hashes import describe_file
from ..io.image_files import load_image, load_mask, save_png
from ..masking.sam_segmenter import SamSegmenter
from ..comfy_bridge import ensure_comfyui
from ..comfy_bridge.model_files import resolve_model_file
from ..comfy_bridge.sampling import comfyui_environment
from ..io.adapter_io import load_adapter
from ..io.cache_files import load_cache, save_cache
from .generation_jobs import Job, dreambench_jobs, plain_job, resolve_seeds
from .generation_references import encode_cache, prepare_reference

SETTINGS_FILE = "settings.json"
SETTINGS_FORMAT = "dreamcache-generate"
SETTINGS_VERSION = 1
# settings that describe where files go or how the run is logged, not what is generated
NON_GENERATIVE = {"out", "replay", "skip_existing", "comfyui", "cpu", "quiet"}


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------

def environment_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    found = comfyui_environment()
    info["comfyui"] = found["comfyui"]
    if "device" in found:
        info["device"] = found["device"]
    return info


def image_file_name(job: Job, prompt_index: int, image_index: int) -> str:
    width = 2 if job.name else 3  # DreamBench folders: 25 prompts
    name = f"{prompt_index:0{width}d}_{image_index:02d}.png"
    return os.path.join(job.name, name) if job.name else name


def run(pipeline: Pipeline, settings: dict, out_dir: str, log: Callable[[str], None] = print,
        adapter=None) -> dict:
    """Generate every image of ``settings`` into ``out_dir``; write and return the settings record.

    Runs inside ``torch.inference_mode()``, as ComfyUI's executor runs a prompt's nodes.
    """
    with torch.inference_mode():
        return _generate_all(pipeline, settings, out_dir, log, adapter)


def _generate_all(pipeline: Pipeline, settings: dict, out_dir: str, log: Callable[[str], None], adapter) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    unet = pipeline.model.get_model_object("diffusion_model")
    if adapter is None and settings["guidance"] != "off":
        if not settings["adapter"]:
            raise ValueError("Give the adapter: --adapter FILE (.safetensors, or the authors' .pt).")
        adapter = load_adapter(settings["adapter"], base_model=unet)
    jobs = dreambench_jobs(settings) if settings["dreambench"] else [plain_job(settings)]
    seeds = resolve_seeds(settings)
    batch = max(1, int(settings["batch"]))
    latent_shape = (4, settings["height"] // 8, settings["width"] // 8)
    segmenter = SamSegmenter(settings["sam"]) if settings["sam"] else None
    negative = pipeline.encode_text(settings["negative"])
    encode_conditioning = pipeline.encode_text(settings["encode_prompt"])

    record = {
        "format": SETTINGS_FORMAT,
        "version": SETTINGS_VERSION,
        "command": "python -m dreamcache_core.evaluation.generate " + shlex.join(settings.get("_argv", [])),
        "settings": {k: v for k, v in settings.items() if not k.startswith("_")},
        "seeds": seeds,
        "files": {"checkpoint": settings.get("_checkpoint_info"), "adapter": describe_file(settings["adapter"]),
                  "sam": describe_file(settings["sam"])},
        "environment": environment_info(),
        "references": [],
        "images": [],
    }
    started = time.perf_counter()
    for job in jobs:
        job_dir = os.path.join(out_dir, job.name) if job.name else out_dir
        os.makedirs(job_dir, exist_ok=True)
        reference_record = {"subject": job.subject, "class": job.class_name, "kind": job.kind,
                            "real_images": [os.path.abspath(p) for p in job.real_images],
                            "reference_image": describe_file(job.reference_image)}
        cache = None
        if settings["guidance"] != "off":
            if job.cache:
                cache = load_cache(job.cache)
                reference_record.update(cache=describe_file(job.cache), reference_image=None)
            else:
                mask = load_mask(job.reference_mask)[None] if job.reference_mask else None
                reference = prepare_reference(load_image(job.reference_image)[None], settings["reference_size"], mask,
                                              segmenter, allow_unmasked=not settings["dreambench"]
                                              or settings["unmasked_references"], source=job.reference_image)
                if reference.mask_source == "none":
                    log(f"warning: {job.reference_image} is used unmasked (no mask, transparency or SAM): its "
                        "background goes into the memory as well")
                encode_start = time.perf_counter()
                cache = encode_cache(pipeline, reference, encode_conditioning, settings["encode_seed"],
                                     settings["token_mask"])
                encode_seconds = time.perf_counter() - encode_start
                prefix = os.path.join(job.name, "reference") if job.name else "reference"
                save_png(reference.image[0], os.path.join(out_dir, prefix + ".png"))
                if reference.mask is not None:
                    save_png(reference.mask[0], os.path.join(out_dir, prefix + "_mask.png"))
                save_cache(cache, os.path.join(out_dir, prefix + "_cache.safetensors"))
                reference_record.update(
                    reference_mask_file=describe_file(job.reference_mask), mask_source=reference.mask_source,
                    prepared_reference=prefix + ".png",
                    prepared_mask=prefix + "_mask.png" if reference.mask is not None else None,
                    cache_file=prefix + "_cache.safetensors", encode_seconds=encode_seconds)
        record["references"].append(reference_record)
        sampler = Sampler(pipeline.model, adapter, cache, settings)
        for prompt_index, prompt in job.prompts:
            positive = pipeline.encode_text(prompt)
            for start in range(0, len(seeds), batch):
                chunk = list(range(start, min(start + batch, len(seeds))))
                files = [image_file_name(job, prompt_index, n) for n in chunk]
                if settings["skip_existing"] and all(os.path.isfile(os.path.join(out_dir, f)) for f in files):
                    seconds = None
                else:
                    batch_start = time.perf_counter()
                    samples = sampler.sample(positive, negative, [seeds[n] for n in chunk], latent_shape)
                    images = pipeline.decode(samples)
                    seconds = time.perf_counter() - batch_start
                    for n, file, image in zip(chunk, files, images):
                        save_png(image, os.path.join(out_dir, file),
                                 {"dreamcache": {"prompt": prompt, "seed": seeds[n], "subject": job.subject}})
                for n, file in zip(chunk, files):
                    record["images"].append({
                        "file": file, "subject": job.subject, "class": job.class_name, "kind": job.kind,
                        "prompt": prompt, "prompt_index": prompt_index, "image_index": n, "seed": seeds[n],
                        "batch_seeds": [seeds[m] for m in chunk],
                        "seconds": None if seconds is None else seconds / len(chunk),
                    })
                log(f"{files[0]}..{files[-1]}  {prompt!r}  seeds {[seeds[n] for n in chunk]}"
                    + ("" if seconds is None else f"  {seconds:.1f} s"))
        if sampler.injection is not None:
            sampler.injection.release_device_copies()
    record["total_seconds"] = time.perf_counter() - started
    with open(os.path.join(out_dir, SETTINGS_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    return record


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache_core.evaluation.generate",
                                description="Generate personalised images with DreamCache through ComfyUI, headless.")
    p.add_argument("--replay", help="a settings.json written by an earlier run: its settings are the defaults "
                                    "(options given here override them)")
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or the custom_nodes parent)")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    p.add_argument("--out", help="output folder (images + settings.json)")
    p.add_argument("--skip-existing", action="store_true", help="keep images already in --out (resume a run)")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", help="SD1.5 / SD2.x / SDXL checkpoint (what Load Checkpoint reads): a path, or a "
                                        "file name in ComfyUI's models/checkpoints")
    g.add_argument("--adapter", help="DreamCache adapter (.safetensors, or the authors' cross_attention-<step>.pt): a "
                                     "path, or a file name in ComfyUI's models/dreamcache (or the pack's models/)")
    g.add_argument("--sam", help="SAM checkpoint (sam_vit_b_01ec64.pth, ...) to cut subjects out of references: a path, "
                                 "or a file name in ComfyUI's models/sams")
    g = p.add_argument_group("reference")
    g.add_argument("--reference", help="reference image of the subject")
    g.add_argument("--reference-mask", help="mask image of --reference (white = subject)")
    g.add_argument("--cache", help="a saved DreamCache (.safetensors from Save DreamCache) instead of --reference")
    g.add_argument("--reference-size", type=int, default=None, help="side of the prepared reference (default: --width)")
    g.add_argument("--encode-prompt", default="", help="text of the Encode pass (default: empty, the paper's null prompt)")
    g.add_argument("--encode-seed", type=int, default=0, help="seed of the small noise of the Encode pass")
    g.add_argument("--no-token-mask", dest="token_mask", action="store_false",
                   help="keep background tokens in the memory (default: the mask drops them, as Encode's mask input)")
    g.add_argument("--subject-name", help="a name for the subject (recorded, used by evaluate)")
    g.add_argument("--class-name", help="the subject's class noun (recorded)")
    g = p.add_argument_group("prompts and seeds")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="text file, one prompt per line (# starts a comment)")
    g.add_argument("--negative", default="", help="negative prompt (default: empty)")
    g.add_argument("--seed", type=int, default=0, help="first seed; image n of a prompt uses seed + n")
    g.add_argument("--seeds", type=int, nargs="+", help="explicit seeds, one image per seed (overrides --seed)")
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--batch", type=int, default=1, help="images sampled together")
    g = p.add_argument_group("sampling")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--sampler", default="euler", help="a ComfyUI sampler name (euler, dpmpp_2m, ddim, ...)")
    g.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name (normal, karras, ...)")
    g.add_argument("--guidance", default="joint", choices=GUIDANCE_MODES,
                   help="joint: stock KSampler, reference in the positive batch (--cfg); combined: DreamCache Guider "
                        "(--text-cfg, --image-cfg); off: the unpatched model (baseline)")
    g.add_argument("--cfg", type=float, default=7.5, help="joint guidance scale")
    g.add_argument("--text-cfg", type=float, default=7.5, help="combined guidance s_T (authors: 7.5)")
    g.add_argument("--image-cfg", type=float, default=5.0, help="combined guidance s_I (authors: 5.0)")
    g.add_argument("--strength", type=float, default=1.0, help="Apply DreamCache strength")
    g.add_argument("--start-percent", type=float, default=0.0)
    g.add_argument("--end-percent", type=float, default=1.0)
    g = p.add_argument_group("DreamBench")
    g.add_argument("--dreambench", help="the google/dreambooth 'dataset' folder: runs the DreamBench protocol "
                                        "(30 subjects x 25 prompts x --images-per-prompt)")
    g.add_argument("--subjects", nargs="+", help="only these DreamBench subjects")
    g.add_argument("--max-prompts", type=int, default=0, help="only the first N prompts per subject (smoke runs)")
    g.add_argument("--reference-index", type=int, default=0,
                   help="which image of a subject folder (name order) is its one reference (default 0)")
    g.add_argument("--reference-masks", help="folder of <subject>.png masks (white = subject) instead of --sam")
    g.add_argument("--unmasked-references", action="store_true",
                   help="allow unmasked DreamBench references (not the paper's protocol)")
    g.add_argument("--unique-token", default="", help="token before the class noun (default: none)")
    return p


def resolve_settings(argv: list, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """argv -> the full settings dict (``--replay`` settings as defaults); validates what can be checked early."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.replay:
        with open(args.replay, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"{args.replay} is not a settings file written by dreamcache_core.evaluation.generate.")
        known = {action.dest for action in parser._actions}
        parser.set_defaults(**{k: v for k, v in previous["settings"].items() if k in known and k not in NON_GENERATIVE})
        args = parser.parse_args(argv)
    settings = vars(args)
    if not settings["out"]:
        raise ValueError("Give the output folder: --out DIR.")
    if settings["reference_size"] is None:
        settings["reference_size"] = settings["width"]
    for name in ("width", "height"):
        if settings[name] % 8 or settings[name] < 64:
            raise ValueError(f"--{name} must be a multiple of 8, at least 64 (got {settings[name]}).")
    for name in ("steps", "images_per_prompt", "batch"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1.")
    return settings


def main(argv=None, pipeline: Optional[Pipeline] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = resolve_settings(argv)
    settings["_argv"] = argv
    log = log or ((lambda message: None) if settings["quiet"] else
                  (lambda message: print(message, file=sys.stderr, flush=True)))

    if pipeline is None:
        ensure_comfyui(settings["comfyui"], cpu=settings["cpu"])
        if not settings["checkpoint"]:
            raise ValueError("Give the base model: --checkpoint FILE (SD1.5, SD2.x or SDXL).")
    for key in ("checkpoint", "adapter", "sam"):  # a path, or a name in ComfyUI's model folders
        settings[key] = resolve_model_file(settings[key], key, settings["comfyui"])
    if pipeline is None:
        settings["_checkpoint_info"] = describe_file(settings["checkpoint"])
        pipeline = load_pipeline(settings["checkpoint"])
    return run(pipeline, settings, settings["out"], log)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
