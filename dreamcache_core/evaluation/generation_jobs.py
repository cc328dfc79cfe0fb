"""What a generation run makes: jobs (a reference or a cache, and its prompts) from DreamBench's subjects or from
the command line's prompts, and the seeds of each prompt's images."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional


from ..io.image_files import list_images
from ..io.prompt_files import read_prompts_file
from ..data import dreambench_prompts, dreambench_subject, dreambench_subjects


@dataclass
class Job:
    """One reference (image or cache) and its prompts."""

    name: str  # subfolder ("" = the output folder itself)
    prompts: list  # [(prompt_index, prompt)]
    reference_image: Optional[str] = None
    reference_mask: Optional[str] = None
    cache: Optional[str] = None
    subject: Optional[str] = None
    class_name: Optional[str] = None
    kind: Optional[str] = None
    real_images: list = field(default_factory=list)


def dreambench_jobs(settings: dict) -> list[Job]:
    dataset = settings["dreambench"]
    if not os.path.isdir(dataset):
        raise ValueError(f"--dreambench {dataset} is not a folder. Point it at the 'dataset' folder of a copy of "
                         "github.com/google/dreambooth (one subfolder of images per subject).")
    names = settings["subjects"] or [s.name for s in dreambench_subjects()]
    jobs = []
    for name in names:
        subject = dreambench_subject(name)
        folder = os.path.join(dataset, subject.name)
        if not os.path.isdir(folder):
            raise ValueError(f"DreamBench subject folder {folder} is missing: --dreambench must be the dreambooth "
                             "'dataset' folder holding all 30 subject folders (or select some with --subjects).")
        images = list_images(folder)
        index = settings["reference_index"]
        if not images or index >= len(images):
            raise ValueError(f"{folder} has {len(images)} images; --reference-index {index} is out of range.")
        prompts = dreambench_prompts(subject, settings["unique_token"])
        if settings["max_prompts"]:
            prompts = prompts[:settings["max_prompts"]]
        mask = None
        if settings["reference_masks"]:
            mask = os.path.join(settings["reference_masks"], f"{subject.name}.png")
            if not os.path.isfile(mask):
                raise ValueError(f"--reference-masks has no {subject.name}.png (white = subject) for {images[index]}.")
        jobs.append(Job(subject.name, list(enumerate(prompts)), reference_image=images[index], reference_mask=mask,
                        subject=subject.name, class_name=subject.class_name, kind=subject.kind, real_images=images))
    return jobs


def plain_job(settings: dict) -> Job:
    prompts = list(settings["prompt"] or [])
    if settings["prompts_file"]:
        prompts += read_prompts_file(settings["prompts_file"])
    if not prompts:
        raise ValueError("Give at least one prompt: --prompt TEXT (repeatable) or --prompts-file FILE.")
    if settings["guidance"] != "off" and not (settings["reference"] or settings["cache"]):
        raise ValueError("Give the subject: --reference IMAGE (with --reference-mask or --sam to cut it out) or "
                         "--cache FILE (saved by Save DreamCache); or --guidance off for the unpersonalised model.")
    if settings["reference"] and settings["cache"]:
        raise ValueError("Give either --reference or --cache, not both.")
    return Job("", list(enumerate(prompts)), reference_image=settings["reference"],
               reference_mask=settings["reference_mask"], cache=settings["cache"], subject=settings["subject_name"],
               class_name=settings["class_name"])


def resolve_seeds(settings: dict) -> list[int]:
    if settings["seeds"]:
        return [int(s) for s in settings["seeds"]]
    return [settings["seed"] + n for n in range(settings["images_per_prompt"])]
