"""The real-server tier: every example workflow runs end to end in a real ComfyUI server.

What a user does, on the CPU: ComfyUI's main.py serves on 127.0.0.1 with the pack in custom_nodes; every file
a workflow names is in its folder (a real-architecture SD1.5 / SD2.1-base / SDXL checkpoint the stock
CheckpointLoaderSimple detects, a DreamCache adapter for it written by the pack's own writer, or for SD2.1 in the
authors' released .pt format, a SAM ViT-B, reference photos; all with seeded random weights, see
random_model_files.py); ComfyUI's own frontend, in headless Chromium, turns each
workflow JSON into the API prompt its Queue button sends; steps and resolution are lowered for a CPU; the prompt
is POSTed to /prompt and /history is polled until it ends. The server executes it as it executes any prompt
(validation, inference mode, its own model management).

Checked per workflow: every SaveImage / PreviewImage produced images; an image whose path runs through Apply
DreamCache or DreamCache Guider differs from one whose path does not (where the workflow has both); and with
every Apply DreamCache at strength 0 (a second prompt, the cached loaders reused) the personalised image changes
back, equal bit for bit to the unpersonalised one where the workflow has one. Workflows saved before later
optional inputs existed (tests/saved_workflows) convert to the same prompts as today's examples.

Skips without COMFYUI_PATH, Chromium or playwright. The first run writes about 10 GB of random model files into
DREAMCACHE_TEST_MODELS (default ~/.cache/comfyui-dreamcache/test-models) and reuses them afterwards.
"""
import json
import os
import time

import numpy as np
import pytest

from comfy_server import new_base_directory, running_server
from conftest import PACK_ROOT, import_comfy
from frontend_prompts import chromium_or_skip, frontend_prompts

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

WORKFLOW_DIR = PACK_ROOT / "example_workflows"
WORKFLOWS = sorted(path.stem for path in WORKFLOW_DIR.glob("*.json"))
# Which random model stands in for each file name the workflows use.
CHECKPOINT_FAMILY = {"v1-5-pruned-emaonly-fp16.safetensors": "sd15", "sd_xl_base_1.0.safetensors": "sdxl",
                     "v2-1_512-ema-pruned.safetensors": "sd21"}
# adapter file name -> (family, format): the pack's .safetensors, or the authors' released .pt (SD2.1-base)
ADAPTER_FAMILY = {"dreamcache_sd15.safetensors": ("sd15", "pack"), "dreamcache_sdxl.safetensors": ("sdxl", "pack"),
                  "cross_attention-199999.pt": ("sd21", "authors")}
CPU_STEPS = 2
CPU_SHORT_SIDE = 64  # pixels: an 8x8 latent
PROMPT_TIMEOUT_S = 1500
PERSONALISING_NODES = {"DreamCacheApply", "DreamCacheGuider"}
IMAGE_OUTPUT_NODES = {"SaveImage", "PreviewImage"}


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))


def widget_files(workflow: dict, node_type: str) -> set:
    return {node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == node_type}


def write_reference_photo(path, hue_shift: int):
    """A photo-like reference: a lit, textured blob on a gradient background (SAM has something to find)."""
    from PIL import Image

    side = 256
    y, x = np.mgrid[0:side, 0:side] / side
    background = np.stack([0.55 + 0.3 * y, 0.6 + 0.2 * x, 0.5 + 0.1 * (x + y)], -1)
    blob = ((x - 0.5) / 0.28) ** 2 + ((y - 0.55) / 0.33) ** 2 < 1
    colour = np.roll(np.array([0.85, 0.25, 0.15]), hue_shift)
    shading = 0.7 + 0.3 * np.cos(12 * x) * np.cos(9 * y)
    image = np.where(blob[..., None], colour * shading[..., None], background)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def link_file(target, source):
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose folders hold every file the example workflows name, and the API prompts of the workflows."""
    import_comfy()  # skips without COMFYUI_PATH
    chromium = chromium_or_skip()
    import random_model_files

    workflows = {name: load_workflow(name) for name in WORKFLOWS}
    root = tmp_path_factory.mktemp("comfyui_workflows")
    base = new_base_directory(root)
    models = base / "models"
    for workflow in workflows.values():
        for name in widget_files(workflow, "CheckpointLoaderSimple"):
            assert name in CHECKPOINT_FAMILY, f"no random stand-in for checkpoint {name}: add it to CHECKPOINT_FAMILY"
            if not (models / "checkpoints" / name).exists():
                link_file(models / "checkpoints" / name, random_model_files.write_random_checkpoint(CHECKPOINT_FAMILY[name]))
        for name in widget_files(workflow, "DreamCacheAdapterLoader"):
            assert name in ADAPTER_FAMILY, f"no random stand-in for adapter {name}: add it to ADAPTER_FAMILY"
            if not (models / "dreamcache" / name).exists():
                family, file_format = ADAPTER_FAMILY[name]
                written = (random_model_files.write_random_authors_adapter() if file_format == "authors"
                           else random_model_files.write_random_adapter(family))
                link_file(models / "dreamcache" / name, written)
        for name in widget_files(workflow, "DreamCacheSAMLoader"):
            if not (models / "sams" / name).exists():
                link_file(models / "sams" / name, random_model_files.write_random_sam())
        for index, name in enumerate(sorted(widget_files(workflow, "LoadImage"))):
            (base / "input").mkdir(exist_ok=True)
            if not (base / "input" / name).exists():
                write_reference_photo(base / "input" / name, hue_shift=index)
    with running_server(root, base) as running:
        running.prompts = frontend_prompts(running.base_url, workflows, chromium)
        running.timings = {}
        yield running
    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in running.timings.items())
    print(f"\nreal-server tier, seconds per prompt: {timings}")


def lowered_for_cpu(prompt: dict) -> dict:
    """The same prompt with CPU-sized steps and resolutions (everything else as the frontend made it)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("KSampler", "BasicScheduler") and isinstance(inputs.get("steps"), int):
            inputs["steps"] = CPU_STEPS
        elif kind == "EmptyLatentImage":
            scale = CPU_SHORT_SIDE / min(inputs["width"], inputs["height"])
            inputs["width"], inputs["height"] = (int(round(inputs[k] * scale / 8)) * 8 for k in ("width", "height"))
        elif kind == "DreamCacheMaskReference":
            inputs["size"] = CPU_SHORT_SIDE
    return prompt


def upstream_types(prompt: dict, node_id: str) -> set:
    """class_type of every node whose output reaches ``node_id``."""
    seen, stack, types = set(), [node_id], set()
    while stack:
        current = stack.pop()
        for value in prompt[current]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in seen:
                seen.add(value[0])
                types.add(prompt[value[0]]["class_type"])
                stack.append(value[0])
    return types


def images_of(server, prompt: dict, entry: dict) -> dict:
    """{output node id: [uint8 arrays]} for every SaveImage / PreviewImage; each must have produced images."""
    out = {}
    for node_id, node in prompt.items():
        if node["class_type"] in IMAGE_OUTPUT_NODES:
            listed = entry["outputs"].get(node_id, {}).get("images", [])
            assert listed, f"{node['class_type']} {node_id} ({node.get('_meta', {}).get('title')}) produced no image"
            out[node_id] = [server.image(reference) for reference in listed]
    return out


def run_prompt(server, name: str, prompt: dict) -> dict:
    started = time.monotonic()
    entry = server.run(prompt, PROMPT_TIMEOUT_S)
    server.timings[name] = server.timings.get(name, 0.0) + time.monotonic() - started
    return images_of(server, prompt, entry)


def with_strength_zero(prompt: dict) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if node["class_type"] == "DreamCacheApply":
            node["inputs"]["strength"] = 0.0
    return prompt


def sampled_outputs(prompt: dict):
    """(personalised, unpersonalised) SaveImage/PreviewImage ids among those downstream of a sampler."""
    personalised, plain = [], []
    for node_id, node in prompt.items():
        if node["class_type"] not in IMAGE_OUTPUT_NODES:
            continue
        upstream = upstream_types(prompt, node_id)
        if "VAEDecode" not in upstream:
            continue  # e.g. the masked reference preview
        (personalised if upstream & PERSONALISING_NODES else plain).append(node_id)
    return personalised, plain


def test_every_workflow_became_an_api_prompt_of_its_nodes(server):
    for name in WORKFLOWS:
        workflow, prompt = load_workflow(name), server.prompts[name]
        executable = {str(n["id"]) for n in workflow["nodes"]
                      if n.get("mode", 0) == 0 and n["type"] not in {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}}
        assert set(prompt) == executable, f"{name}: the frontend's prompt holds nodes {sorted(prompt)}"
        for node_id, node in prompt.items():
            assert node["class_type"] in server.object_info, f"{name}: {node['class_type']} is unknown to the server"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_end_to_end_in_the_server(server, name):
    prompt = lowered_for_cpu(server.prompts[name])
    personalised, plain = sampled_outputs(prompt)
    assert personalised, f"{name}: no image output is downstream of Apply DreamCache or DreamCache Guider"

    images = run_prompt(server, name, prompt)
    for node_id, arrays in images.items():
        for array in arrays:
            assert array.ndim == 3 and array.shape[2] in (3, 4) and min(array.shape[:2]) >= 8, (name, node_id)
            assert array.std() > 0, f"{name}: output {node_id} is one flat colour"
    reference = {k: v for k, v in images.items() if k not in personalised + plain}
    assert reference, f"{name}: the masked reference preview produced nothing"
    for node_id in personalised:
        for other in plain:
            assert not np.array_equal(images[node_id][0], images[other][0]), (
                f"{name}: the personalised image {node_id} equals the unpersonalised image {other}")

    if any(node["class_type"] == "DreamCacheApply" for node in prompt.values()):
        off = run_prompt(server, name, with_strength_zero(prompt))
        for node_id in personalised:
            if "DreamCacheApply" not in upstream_types(prompt, node_id):
                continue  # personalised by the guider only: strength is Apply's
            assert not np.array_equal(off[node_id][0], images[node_id][0]), (
                f"{name}: strength 0 gave the same image as strength 1 at output {node_id}")
            for other in plain:
                assert np.array_equal(off[node_id][0], images[other][0]), (
                    f"{name}: at strength 0 output {node_id} differs from the unpersonalised output {other}")

    if os.environ.get("DREAMCACHE_KEEP_SERVER_IMAGES"):
        from PIL import Image
        folder = os.path.join(os.environ["DREAMCACHE_KEEP_SERVER_IMAGES"], name)
        os.makedirs(folder, exist_ok=True)
        for node_id, arrays in images.items():
            for index, array in enumerate(arrays):
                Image.fromarray(array).save(os.path.join(folder, f"node{node_id}_{index}.png"))


SAVED_BEFORE_DIR = PACK_ROOT / "tests" / "saved_workflows"


def test_workflows_saved_before_the_new_inputs_give_the_same_prompts(server):
    """Workflows saved by the pack's first 0.1 examples, before the optional inputs crop_position, batch_size,
    negative_cache, layer_preset, weight_schedule, frame_weights and the adapter loader's info output existed, hold
    fewer widget values and slots. The frontend fills the new widgets with their defaults, so each gives exactly the API prompt of
    today's example workflow, which ran above. The old values keep their meaning."""
    saved = {path.name[:-len("_v0_1_saved.json")]: json.loads(path.read_text(encoding="utf-8"))
             for path in sorted(SAVED_BEFORE_DIR.glob("*_v0_1_saved.json"))}
    assert sorted(saved) == ["dreamcache_basic", "dreamcache_guider", "dreamcache_two_subjects_regions"]
    old_prompts = frontend_prompts(server.base_url, saved, chromium_or_skip())
    for name, prompt in old_prompts.items():
        assert prompt == server.prompts[name], f"{name}: the saved workflow converts to another prompt"
        kinds = {node["class_type"]: node["inputs"] for node in prompt.values()}
        assert kinds["DreamCacheMaskReference"]["crop_position"] == "pad"
        assert kinds["DreamCacheEncode"]["batch_size"] == 16
        personalising = kinds.get("DreamCacheApply") or kinds["DreamCacheGuider"]
        assert personalising["layer_preset"] == "all layers" and personalising["frame_weights"] == ""
        if "DreamCacheApply" in kinds:
            assert kinds["DreamCacheApply"]["weight_schedule"] == "linear"
            assert kinds["DreamCacheApply"]["strength"] == 1.0 and kinds["DreamCacheApply"]["apply_to"] == "positive only"
