"""The real-server tier, faults: a ComfyUI server keeps giving the same pictures after an interrupted prompt and
after POST /free, and its memory does not grow over many personalised prompts.

A real ComfyUI (main.py, on the CPU) serves with the pack installed and a random real-architecture SD1.5
checkpoint and adapter in its folders (random_model_files.py). The prompts are written in API format: a plain one
(checkpoint -> KSampler -> SaveLatent) and a personalised one (a cut-out PNG -> Invert Mask -> Mask Reference ->
VAE Encode -> Encode DreamCache -> Apply DreamCache -> KSampler -> SaveLatent); latents are compared bit for bit.

ComfyUI's default cache keeps only the outputs of the last prompt's nodes, so running the plain and the
personalised prompt alternately makes the server sample again each time with the same loaded model; the tests
check from /history that the sampler did run (it is not in the prompt's cached nodes).

The memory test queues 30 personalised prompts, each with another reference, and reads the server process's
resident memory (RSS) after each. The unit is one reference's state: its cache as Save DreamCache stores it
plus its reference latent (about 6 MiB for SD1.5 at 512 px). RSS after a prompt swings from one prompt to the
next (measured: up to 80 MiB on ComfyUI 0.8.0, 70 MiB on 0.3.64, as the allocator keeps or returns freed blocks),
so the bounds hold its floor, which a leak raises and a swing does not: over the last 20 prompts (the first ten
warm the allocator and ComfyUI's caches), the lowest RSS of each block of 5 prompts. The least-squares slope of
the four floors stays under half a state per prompt, and the last floor lies less than 10 states above the
first. A leak of anything a prompt makes per reference (its cache, its patched model, its adapter patcher, a
copy of the adapter) raises the floor by at least one state per prompt: a slope of one state or more and 15
states between the first and the last floor. Measured floors moved by under 1 MiB (0.8.0) and -20 MiB (0.3.64)
over those 20 prompts.
Set DREAMCACHE_REPORT_DIR to get the measured figures as server_memory.json.
"""
import json
import os
import time
import urllib.request

import numpy as np
import pytest

from comfy_server import PromptFailed, link_file, new_base_directory, request_json, running_server
from conftest import import_comfy

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
ADAPTER = "dreamcache_sd15.safetensors"
REFERENCE_SIDE = 512  # the masked reference (a 64x64 latent), as users cut it: a leaked cache shows in RSS
LATENT_SIDE = 64  # pixels of the sampled image
STEPS = 2
LONG_STEPS = 400  # the prompt that is interrupted
PROMPT_TIMEOUT_S = 900
MEMORY_PROMPTS = 30
MEMORY_WINDOW = 20  # the last prompts, over which growth is bounded
FLOOR_BLOCK = 5  # prompts per block whose lowest RSS is the floor


def write_cutout_reference(path, seed: int):
    """An RGBA photo of a shaded blob on a transparent background; position, size and colour from ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = 192
    y, x = np.mgrid[0:side, 0:side] / side
    centre, radius = rng.uniform(0.4, 0.6, 2), rng.uniform(0.22, 0.32, 2)
    blob = ((x - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2 < 1
    shading = 0.7 + 0.3 * np.cos(rng.uniform(6, 14) * x) * np.cos(rng.uniform(6, 14) * y)
    rgb = np.clip(rng.uniform(0.1, 0.9, 3) * shading[..., None], 0, 1)
    rgba = np.concatenate([rgb, blob[..., None].astype(float)], -1)
    Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").save(path)


def plain_prompt(seed: int, steps: int = STEPS, prefix: str = "plain") -> dict:
    return {
        "checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "positive": {"class_type": "CLIPTextEncode",
                     "inputs": {"text": "a photo of a backpack on a mossy rock", "clip": ["checkpoint", 1]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["checkpoint", 1]}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": LATENT_SIDE, "height": LATENT_SIDE, "batch_size": 1}},
        "sampler": {"class_type": "KSampler",
                    "inputs": {"model": ["checkpoint", 0], "seed": seed, "steps": steps, "cfg": 7.5,
                               "sampler_name": "euler", "scheduler": "normal", "positive": ["positive", 0],
                               "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent",
                 "inputs": {"samples": ["sampler", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def personalised_prompt(reference: str, seed: int, steps: int = STEPS, prefix: str = "personalised",
                        save_cache: bool = False) -> dict:
    prompt = plain_prompt(seed, steps, prefix)
    prompt.update({
        "reference": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "subject_mask": {"class_type": "InvertMask", "inputs": {"mask": ["reference", 1]}},
        "cut_out": {"class_type": "DreamCacheMaskReference",
                    "inputs": {"image": ["reference", 0], "size": REFERENCE_SIDE, "mask": ["subject_mask", 0]}},
        "reference_latent": {"class_type": "VAEEncode", "inputs": {"pixels": ["cut_out", 0], "vae": ["checkpoint", 2]}},
        "caching_text": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["checkpoint", 1]}},
        "encode": {"class_type": "DreamCacheEncode",
                   "inputs": {"model": ["checkpoint", 0], "reference": ["reference_latent", 0],
                              "conditioning": ["caching_text", 0], "seed": 0, "mask": ["cut_out", 1]}},
        "adapter": {"class_type": "DreamCacheAdapterLoader", "inputs": {"adapter_name": ADAPTER}},
        "apply": {"class_type": "DreamCacheApply",
                  "inputs": {"model": ["checkpoint", 0], "adapter": ["adapter", 0], "cache": ["encode", 0],
                             "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                             "apply_to": "positive only"}},
    })
    prompt["sampler"]["inputs"]["model"] = ["apply", 0]
    if save_cache:
        prompt["save_cache"] = {"class_type": "DreamCacheSave",
                                "inputs": {"cache": ["encode", 0], "filename_prefix": f"{prefix}_cache"}}
    return prompt


def post(server, path: str, body: dict):
    request = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, f"POST {path}: HTTP {response.status}"


def history_entry(server, prompt_id: str, timeout_s: float = PROMPT_TIMEOUT_S) -> dict:
    """The /history entry of a prompt once it ended, whether it succeeded or not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        if server.process.poll() is not None:
            raise PromptFailed(f"ComfyUI exited (code {server.process.returncode})")
        time.sleep(0.5)
    raise PromptFailed(f"prompt {prompt_id} did not end within {timeout_s:.0f} s")


def cached_nodes(entry: dict) -> set:
    """The node ids the executor took from its cache instead of running (its execution_cached message)."""
    cached = set()
    for event, data in entry["status"].get("messages", []):
        if event == "execution_cached":
            cached |= set(data.get("nodes", []))
    return cached


def saved_latent(server, entry: dict):
    """The latent the prompt's SaveLatent wrote (from the output folder it names in /history)."""
    from safetensors.torch import load_file

    (listed,) = entry["outputs"]["save"]["latents"]
    path = server.base / "output" / listed.get("subfolder", "") / listed["filename"]
    return load_file(str(path))["latent_tensor"]


def run_sampled(server, prompt: dict):
    """Run ``prompt``; its saved latent. The sampler must have run, not come from ComfyUI's cache."""
    entry = server.run(prompt, PROMPT_TIMEOUT_S)
    assert "sampler" not in cached_nodes(entry), "the sampler came from the cache: the check would prove nothing"
    return saved_latent(server, entry)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import_comfy()  # skips without COMFYUI_PATH
    import random_model_files

    root = tmp_path_factory.mktemp("comfyui_faults")
    base = new_base_directory(root)
    link_file(base / "models" / "checkpoints" / CHECKPOINT, random_model_files.write_random_checkpoint("sd15"))
    link_file(base / "models" / "dreamcache" / ADAPTER, random_model_files.write_random_adapter("sd15"))
    (base / "input").mkdir(parents=True, exist_ok=True)
    for seed in range(MEMORY_PROMPTS + 1):
        write_cutout_reference(base / "input" / f"reference_{seed}.png", seed)
    with running_server(root, base) as running:
        yield running


@pytest.fixture(scope="module")
def before(server):
    """The plain and the personalised latent (seed 5) on the fresh server."""
    plain = run_sampled(server, plain_prompt(seed=5))
    personalised = run_sampled(server, personalised_prompt("reference_0.png", seed=5))
    assert not torch_equal(plain, personalised), "the adapter should change the sample"
    return plain, personalised


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def wait_for_sampling_steps(server, prompt_id: str, steps: int, at_least: int = 2, timeout_s: float = 300):
    """Until the server's progress bar for a ``steps``-step sampling shows ``at_least`` steps done."""
    import re

    pattern = re.compile(rf"\b(\d+)/{steps} \[")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [int(n) for n in pattern.findall(server.log())]
        if done and max(done) >= at_least:
            return
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        assert not entry, f"the long prompt ended before it could be interrupted: {entry and entry['status']}"
        time.sleep(0.2)
    raise PromptFailed(f"the long prompt showed no sampling progress within {timeout_s} s")


def test_an_interrupted_personalised_prompt_leaves_the_server_as_it_was(server, before):
    plain, personalised = before
    prompt_id = server.queue(personalised_prompt("reference_1.png", seed=9, steps=LONG_STEPS, prefix="interrupted"))
    wait_for_sampling_steps(server, prompt_id, LONG_STEPS)
    post(server, "/interrupt", {})
    entry = history_entry(server, prompt_id)
    events = [event for event, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in events, entry["status"]
    assert "save" not in entry.get("outputs", {}), "the interrupted prompt should not have saved a latent"
    # the same model and adapter, sampled again after the interrupt: bit for bit what they gave before it
    assert torch_equal(run_sampled(server, plain_prompt(seed=5)), plain)
    assert torch_equal(run_sampled(server, personalised_prompt("reference_0.png", seed=5)), personalised)


def test_free_with_unload_models_then_the_same_pictures(server, before):
    plain, personalised = before
    post(server, "/free", {"unload_models": True, "free_memory": True})
    time.sleep(3.0)  # the prompt worker applies the flags when it wakes, before it takes the next prompt
    entry = server.run(plain_prompt(seed=5), PROMPT_TIMEOUT_S)
    assert not cached_nodes(entry), "after free_memory every node should run again (the checkpoint reloaded)"
    assert torch_equal(saved_latent(server, entry), plain)
    assert torch_equal(run_sampled(server, personalised_prompt("reference_0.png", seed=5)), personalised)


def process_rss(server) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


def test_server_memory_does_not_grow_over_many_personalised_prompts(server, before):
    import gc

    rss = []
    state_bytes = None
    for index in range(MEMORY_PROMPTS):
        reference = f"reference_{index + 1}.png"
        prompt = personalised_prompt(reference, seed=index, steps=1, prefix=f"memory_{index}", save_cache=index == 0)
        entry = server.run(prompt, PROMPT_TIMEOUT_S)
        assert "encode" not in cached_nodes(entry), "each prompt should encode its own reference"
        if index == 0:
            state_bytes = cache_file_bytes(server, "memory_0_cache")
        gc.collect()
        rss.append(process_rss(server))
    window = np.array(rss[-MEMORY_WINDOW:], dtype=np.float64)
    floors = window.reshape(-1, FLOOR_BLOCK).min(axis=1)  # the lowest RSS of each block of prompts
    growth = floors[-1] - floors[0]
    block_centres = np.arange(len(floors)) * FLOOR_BLOCK + (FLOOR_BLOCK - 1) / 2
    slope = np.polyfit(block_centres, floors, 1)[0]  # bytes per prompt
    reference_latent_bytes = 4 * (REFERENCE_SIDE // 8) ** 2 * 4
    state = state_bytes + reference_latent_bytes
    mib = 2 ** 20
    figures = {"rss_mib_after_each_prompt": [round(value / mib, 1) for value in rss],
               "last_prompts": MEMORY_WINDOW, "floor_block": FLOOR_BLOCK,
               "floors_mib": [round(value / mib, 1) for value in floors],
               "floor_growth_mib_over_last_prompts": round(growth / mib, 1),
               "floor_slope_mib_per_prompt": round(slope / mib, 2),
               "largest_swing_mib": round(float(np.max(np.abs(np.diff(window)))) / mib, 1), "reference_state_mib": round(state / mib, 2),
               "slope_bound_mib_per_prompt": round(0.5 * state / mib, 2), "growth_bound_mib": round(10 * state / mib, 1)}
    print("server memory:", json.dumps(figures))
    if os.environ.get("DREAMCACHE_REPORT_DIR"):
        with open(os.path.join(os.environ["DREAMCACHE_REPORT_DIR"], "server_memory.json"), "w") as report:
            json.dump(figures, report, indent=1)
    assert slope < 0.5 * state and growth < 10 * state, f"the server's memory floor keeps rising: {figures}"


def cache_file_bytes(server, prefix: str) -> int:
    """Size of the cache file Save DreamCache wrote under ``prefix`` (the reference's state, as stored)."""
    found = [path for path in (server.base / "output").rglob(f"{prefix}*") if path.is_file()]
    assert found, f"Save DreamCache wrote no file with prefix {prefix}"
    return max(path.stat().st_size for path in found)


def test_the_fault_prompts_are_valid_api_prompts(server):
    """The prompts above use only inputs the server lists (so a change of the node contract shows here first)."""
    info = server.object_info
    for prompt in (plain_prompt(1), personalised_prompt("reference_0.png", 1, save_cache=True)):
        for node_id, node in prompt.items():
            declared = info[node["class_type"]]["input"]
            names = set(declared.get("required", {})) | set(declared.get("optional", {}))
            assert set(node["inputs"]) <= names, (node_id, set(node["inputs"]) - names)
            assert set(declared.get("required", {})) <= set(node["inputs"]), (node_id, node["class_type"])
    assert request_json(server.base_url + "/object_info/DreamCacheSave")
