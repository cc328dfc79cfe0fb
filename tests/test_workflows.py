"""The example workflows (example_workflows/*.json) load in ComfyUI as they are.

They are UI-format workflows (what the frontend saves and ComfyUI lists as
templates). Two layers of checks, for every JSON in the folder:

- structure (no ComfyUI needed): unique ids, every link joins an existing
  output slot to an existing input slot, both ends agree with the link table,
  the link's type is the output's and the input's type, the saved execution
  order respects the links, and DreamCache nodes use only the node ids of the
  design's node contract;
- against ComfyUI (needs COMFYUI_PATH): every node type exists (ComfyUI's
  nodes or this pack's), every input name exists in the node's INPUT_TYPES
  with the declared type, required inputs are linked or have a widget value,
  links join types ComfyUI accepts, and widgets_values has one entry per
  widget (plus the frontend's extra "control after generate" and upload
  entries) with a value of the widget's kind.
"""
import asyncio
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from conftest import PACK_ROOT, import_comfy
from node_contract import NODE_IDS as DREAMCACHE_NODE_IDS

WORKFLOW_DIR = PACK_ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))

# Nodes that live in the frontend only: the server does not know them.
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MODE_ALWAYS = 0
FILE_SUFFIXES = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".gif",
                 ".mp4", ".webm", ".wav", ".flac", ".mp3", ".gguf", ".onnx", ".yaml", ".json"}


def load_workflow(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def workflow_params():
    return [pytest.param(path, id=path.name) for path in WORKFLOWS]


def plain(type_name) -> str:
    """ComfyUI's type names are str subclasses (IO enums, V3 IO types): compare their plain value."""
    return str.__str__(type_name) if isinstance(type_name, str) else type_name


def nodes_by_id(workflow):
    return {node["id"]: node for node in workflow["nodes"]}


def links_by_id(workflow):
    return {link[0]: link for link in workflow["links"]}


# ---------------------------------------------------------------- structure (no ComfyUI)


def test_the_example_workflows_are_there():
    names = {path.name for path in WORKFLOWS}
    assert {"dreamcache_basic.json", "dreamcache_on_off.json"} <= names, f"example_workflows/ holds {sorted(names)}"


@pytest.mark.parametrize("path", workflow_params())
def test_workflow_is_ui_format(path):
    workflow = load_workflow(path)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in workflow, f"{path.name}: no '{key}' (not a UI-format workflow?)"
    assert workflow["version"] == 0.4
    for node in workflow["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in node, f"{path.name}: node {node.get('id')} ({node.get('type')}) has no '{key}'"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        if node["type"] not in FRONTEND_ONLY_NODES:
            assert node["properties"].get("Node name for S&R") == node["type"], (
                f"{path.name}: node {node['id']} ({node['type']}): properties['Node name for S&R'] should be its type")


# Loader node -> the models folder its file goes in (what the frontend's missing-models dialog shows).
MODEL_FOLDER_OF_LOADER = {"CheckpointLoaderSimple": "checkpoints", "DreamCacheSAMLoader": "sams"}


@pytest.mark.parametrize("path", workflow_params())
def test_model_loaders_tell_the_frontend_which_file_goes_where(path):
    """properties.models (name, url, directory) on each loader whose file has a public download: the frontend
    lists the missing ones with their folder and a link when the workflow is opened."""
    workflow = load_workflow(path)
    loaders = [node for node in workflow["nodes"] if node["type"] in MODEL_FOLDER_OF_LOADER]
    assert loaders, f"{path.name} loads no checkpoint"
    for node in loaders:
        models = node["properties"].get("models")
        where = f"{path.name}: {node['type']} {node['id']}"
        assert models and len(models) == 1, f"{where} has no models metadata"
        (model,) = models
        assert model["name"] == node["widgets_values"][0], f"{where}: metadata names {model['name']}, the widget another"
        assert model["directory"] == MODEL_FOLDER_OF_LOADER[node["type"]], f"{where}: directory {model['directory']}"
        assert model["url"].startswith("https://") and model["url"].split("?")[0].endswith(model["name"]), where


# The base each example's checkpoint and adapter file are for: they must agree (an adapter works only on its base).
CHECKPOINT_BASE = {"v1-5-pruned-emaonly-fp16.safetensors": "SD1.5", "sd_xl_base_1.0.safetensors": "SDXL",
                   "v2-1_512-ema-pruned.safetensors": "SD2.1-base"}
ADAPTER_BASE = {"dreamcache_sd15.safetensors": "SD1.5", "dreamcache_sdxl.safetensors": "SDXL"}
AUTHORS_ADAPTER = re.compile(r"^cross_attention-\d+\.pt$")  # the authors' released SD2.1-base adapter


def base_of_adapter(name: str):
    return "SD2.1-base" if AUTHORS_ADAPTER.match(name) else ADAPTER_BASE.get(name)


@pytest.mark.parametrize("path", workflow_params())
def test_adapters_and_checkpoints_are_for_the_same_base(path):
    workflow = load_workflow(path)
    checkpoints = {node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "CheckpointLoaderSimple"}
    adapters = {node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "DreamCacheAdapterLoader"}
    assert checkpoints and adapters, f"{path.name}: a checkpoint and an adapter loader are expected"
    bases = {CHECKPOINT_BASE.get(name) for name in checkpoints} | {base_of_adapter(name) for name in adapters}
    assert None not in bases, f"{path.name}: a file of unknown base among {sorted(checkpoints | adapters)}"
    assert len(bases) == 1, f"{path.name}: checkpoints {sorted(checkpoints)} and adapters {sorted(adapters)} mix {bases}"


def test_the_sd21_workflow_runs_the_authors_adapter_on_sd21_base_at_512():
    """The one combination that works without training: SD2.1-base (512, epsilon) with the authors' released
    adapter, read directly; its Note says where both files come from and where they go."""
    workflow = load_workflow(WORKFLOW_DIR / "dreamcache_sd21.json")
    by_type = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    (checkpoint,) = by_type["CheckpointLoaderSimple"]
    assert checkpoint["widgets_values"] == ["v2-1_512-ema-pruned.safetensors"]
    assert checkpoint["properties"]["models"][0]["url"].startswith(
        "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors")
    (adapter,) = by_type["DreamCacheAdapterLoader"]
    assert AUTHORS_ADAPTER.match(adapter["widgets_values"][0]), adapter["widgets_values"]
    (latent,) = by_type["EmptyLatentImage"]
    assert latent["widgets_values"][:2] == [512, 512]
    (mask_reference,) = by_type["DreamCacheMaskReference"]
    assert mask_reference["widgets_values"][0] == 512
    (note,) = by_type["Note"]
    text = note["widgets_values"][0]
    for needed in ("github.com/Emanuele97x/DreamCache", "ComfyUI/models/dreamcache", "ComfyUI/models/checkpoints",
                   "huggingface.co/stabilityai/stable-diffusion-2-1-base", adapter["widgets_values"][0],
                   "weights_only=True"):
        assert needed in text, f"the SD2.1 workflow's Note does not say {needed!r}"


@pytest.mark.parametrize("path", workflow_params())
def test_ids_are_unique_and_counted(path):
    workflow = load_workflow(path)
    node_ids = [node["id"] for node in workflow["nodes"]]
    link_ids = [link[0] for link in workflow["links"]]
    assert len(node_ids) == len(set(node_ids)), f"{path.name}: duplicate node ids"
    assert len(link_ids) == len(set(link_ids)), f"{path.name}: duplicate link ids"
    assert workflow["last_node_id"] >= max(node_ids)
    assert workflow["last_link_id"] >= max(link_ids, default=0)
    group_ids = [group.get("id") for group in workflow["groups"]]
    assert len(group_ids) == len(set(group_ids))


@pytest.mark.parametrize("path", workflow_params())
def test_links_join_existing_slots_of_matching_type(path):
    workflow = load_workflow(path)
    nodes = nodes_by_id(workflow)
    for link in workflow["links"]:
        assert len(link) == 6, f"{path.name}: link {link} is not [id, from_node, from_slot, to_node, to_slot, type]"
        link_id, from_id, from_slot, to_id, to_slot, link_type = link
        where = f"{path.name}: link {link_id}"
        assert from_id in nodes, f"{where} starts at missing node {from_id}"
        assert to_id in nodes, f"{where} ends at missing node {to_id}"
        source, target = nodes[from_id], nodes[to_id]
        outputs, inputs = source.get("outputs") or [], target.get("inputs") or []
        assert 0 <= from_slot < len(outputs), f"{where}: {source['type']} has no output slot {from_slot}"
        assert 0 <= to_slot < len(inputs), f"{where}: {target['type']} has no input slot {to_slot}"
        output, input_ = outputs[from_slot], inputs[to_slot]
        assert link_id in (output.get("links") or []), f"{where} is missing from {source['type']}.{output['name']}"
        assert input_.get("link") == link_id, f"{where}: {target['type']}.{input_['name']} holds {input_.get('link')}"
        for end, end_type in (("output " + output["name"], output["type"]), ("input " + input_["name"], input_["type"])):
            assert end_type in (link_type, "*") or link_type == "*", (
                f"{where} has type {link_type} but {end} is {end_type}")


@pytest.mark.parametrize("path", workflow_params())
def test_nodes_reference_only_existing_links(path):
    workflow = load_workflow(path)
    links = links_by_id(workflow)
    for node in workflow["nodes"]:
        names = [input_["name"] for input_ in node.get("inputs") or []]
        assert len(names) == len(set(names)), f"{path.name}: node {node['id']} lists an input twice"
        for slot, input_ in enumerate(node.get("inputs") or []):
            if "widget" in input_:
                assert input_["widget"].get("name") == input_["name"]
            link_id = input_.get("link")
            if link_id is not None:
                assert link_id in links, f"{path.name}: node {node['id']}.{input_['name']} uses missing link {link_id}"
                assert links[link_id][3:5] == [node["id"], slot]
        for slot, output in enumerate(node.get("outputs") or []):
            if "slot_index" in output:
                assert output["slot_index"] == slot
            for link_id in output.get("links") or []:
                assert link_id in links, f"{path.name}: node {node['id']}.{output['name']} uses missing link {link_id}"
                assert links[link_id][1:3] == [node["id"], slot]


@pytest.mark.parametrize("path", workflow_params())
def test_saved_order_respects_the_links(path):
    workflow = load_workflow(path)
    nodes = nodes_by_id(workflow)
    orders = sorted(node["order"] for node in workflow["nodes"])
    assert orders == list(range(len(orders))), f"{path.name}: node orders are not 0..{len(orders) - 1}"
    for link_id, from_id, _, to_id, _, _ in workflow["links"]:
        assert nodes[from_id]["order"] < nodes[to_id]["order"], (
            f"{path.name}: link {link_id} runs from node {from_id} to node {to_id}, which comes earlier")


@pytest.mark.parametrize("path", workflow_params())
def test_dreamcache_nodes_use_the_contract_ids(path):
    workflow = load_workflow(path)
    used = {node["type"] for node in workflow["nodes"]}
    unknown = {t for t in used if t.lower().startswith("dreamcache") and t not in DREAMCACHE_NODE_IDS}
    assert not unknown, f"{path.name} uses DreamCache node ids outside the node contract: {sorted(unknown)}"


# ---------------------------------------------------------------- against ComfyUI (COMFYUI_PATH)

_REGISTRY = {}


def import_comfy_utils_package(comfy_path: Path):
    """Import ComfyUI's top-level ``utils`` package, as main.py does before anything else.

    ComfyUI's nodes.py puts comfy/ first on sys.path, after which ``import utils``
    finds comfy/utils.py instead, and server.py (which comfy_extras/nodes_images.py
    imports) fails on ``utils.install_util``.
    """
    if "utils" in sys.modules:
        return
    package_dir = comfy_path / "utils"
    spec = importlib.util.spec_from_file_location("utils", package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["utils"] = module
    spec.loader.exec_module(module)


@pytest.fixture(scope="module")
def registry():
    """(all node classes, this pack's node classes), as a ComfyUI server would have them."""
    comfy_path = import_comfy()
    if not _REGISTRY:
        import_comfy_utils_package(comfy_path)
        import nodes as comfy_nodes

        # The built-in extra nodes (comfy_extras: PrimitiveInt, ...), not other custom nodes and not API nodes.
        asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        from comfyui_dreamcache.nodes import NODE_CLASS_MAPPINGS as pack_nodes

        _REGISTRY["all"] = {**comfy_nodes.NODE_CLASS_MAPPINGS, **pack_nodes}
        _REGISTRY["pack"] = dict(pack_nodes)
    return _REGISTRY["all"], _REGISTRY["pack"]


def input_specs(node_class):
    """[(name, type, options, required)] in the node's input order (the frontend's widget order)."""
    declared = node_class.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            type_ = spec[0]
            if isinstance(type_, (list, tuple)):
                options = {**options, "options": list(type_)}
                type_ = "COMBO"
            specs.append((name, plain(type_), options, section == "required"))
    return specs


def is_widget(type_, options):
    return type_ in WIDGET_TYPES and not options.get("forceInput", False)


def widget_entries(name, type_, options):
    """The widgets_values entries the frontend saves for one widget input: the value first."""
    entries = ["value"]
    if type_ == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
        entries.append("control")
    if type_ == "COMBO" and options.get("control_after_generate"):
        entries += ["control", "filter"]
    if type_ == "COMBO" and any(options.get(option) for option in UPLOAD_OPTIONS):
        entries.append("upload")
    return entries


def check_widget_value(where, type_, options, value):
    if type_ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), f"{where}: {value} out of range"
    elif type_ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), f"{where}: {value} out of range"
    elif type_ == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    elif type_ == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif type_ == "COMBO":
        choices = options.get("options") or []
        is_file_name = Path(str(value)).suffix.lower() in FILE_SUFFIXES
        # File names are placeholders the user replaces; other choices must be valid as saved.
        if not is_file_name:
            assert value in choices, f"{where}: {value!r} is not one of {choices}"


def checked_nodes(workflow, all_nodes):
    """The workflow's server-side nodes of known type (test_node_types_exist reports unknown ones)."""
    return [node for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY_NODES and node["type"] in all_nodes]


def output_types(node_class):
    return [plain(t) for t in node_class.RETURN_TYPES]


@pytest.mark.parametrize("path", workflow_params())
@pytest.mark.comfy
def test_node_types_exist(path, registry):
    all_nodes, pack_nodes = registry
    workflow = load_workflow(path)
    missing = DREAMCACHE_NODE_IDS - set(pack_nodes)
    assert not missing, f"the pack lacks node ids of the node contract: {sorted(missing)}"
    for node in workflow["nodes"]:
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_NODES:
            continue
        if node_type in DREAMCACHE_NODE_IDS:
            assert node_type in pack_nodes, f"{path.name}: node {node['id']} {node_type} is not in the pack"
        assert node_type in all_nodes, f"{path.name}: node {node['id']}: ComfyUI has no node type {node_type}"


@pytest.mark.parametrize("path", workflow_params())
@pytest.mark.comfy
def test_inputs_match_input_types(path, registry):
    all_nodes, _ = registry
    workflow = load_workflow(path)
    for node in checked_nodes(workflow, all_nodes):
        node_class = all_nodes[node["type"]]
        specs = {name: (type_, options, required) for name, type_, options, required in input_specs(node_class)}
        where = f"{path.name}: node {node['id']} {node['type']}"
        linked = set()
        for input_ in node.get("inputs") or []:
            name = input_["name"]
            assert name in specs, f"{where}: input '{name}' is not in INPUT_TYPES ({sorted(specs)})"
            type_, options, _ = specs[name]
            assert input_["type"] == type_, f"{where}: input '{name}' is saved as {input_['type']}, declared {type_}"
            if is_widget(type_, options):
                assert "widget" in input_ or options.get("forceInput"), f"{where}: widget input '{name}' lacks 'widget'"
            if input_.get("link") is not None:
                linked.add(name)
        if node["mode"] != MODE_ALWAYS:
            continue  # muted or bypassed nodes need no inputs
        for name, (type_, options, required) in specs.items():
            if required and not is_widget(type_, options):
                assert name in linked, f"{where}: required input '{name}' ({type_}) is not connected"


@pytest.mark.parametrize("path", workflow_params())
@pytest.mark.comfy
def test_outputs_match_return_types(path, registry):
    all_nodes, _ = registry
    workflow = load_workflow(path)
    for node in checked_nodes(workflow, all_nodes):
        node_class = all_nodes[node["type"]]
        where = f"{path.name}: node {node['id']} {node['type']}"
        types = output_types(node_class)
        names = [plain(n) for n in (getattr(node_class, "RETURN_NAMES", None) or types)]
        outputs = node.get("outputs") or []
        assert len(outputs) == len(types), f"{where}: {len(outputs)} outputs saved, RETURN_TYPES has {len(types)}"
        for slot, output in enumerate(outputs):
            assert output["type"] == types[slot], f"{where}: output {slot} saved as {output['type']}, returns {types[slot]}"
            assert output["name"] in (names[slot], types[slot]), f"{where}: output {slot} is named {output['name']}"


@pytest.mark.parametrize("path", workflow_params())
@pytest.mark.comfy
def test_links_join_types_comfyui_accepts(path, registry):
    from comfy_execution.validation import validate_node_input

    all_nodes, _ = registry
    workflow = load_workflow(path)
    nodes = nodes_by_id(workflow)
    for link_id, from_id, from_slot, to_id, to_slot, link_type in workflow["links"]:
        source, target = nodes[from_id], nodes[to_id]
        if not all(node in checked_nodes(workflow, all_nodes) for node in (source, target)):
            continue
        returned = output_types(all_nodes[source["type"]])[from_slot]
        input_name = target["inputs"][to_slot]["name"]
        specs = {name: type_ for name, type_, _, _ in input_specs(all_nodes[target["type"]])}
        expected = specs[input_name]
        assert validate_node_input(returned, expected), (
            f"{path.name}: link {link_id} feeds {source['type']}'s {returned} into {target['type']}.{input_name} ({expected})")


@pytest.mark.parametrize("path", workflow_params())
@pytest.mark.comfy
def test_widget_values_match_the_widgets(path, registry):
    all_nodes, _ = registry
    workflow = load_workflow(path)
    for node in checked_nodes(workflow, all_nodes):
        where = f"{path.name}: node {node['id']} {node['type']}"
        expected = []  # (input name, entry kind, type, options)
        for name, type_, options, _ in input_specs(all_nodes[node["type"]]):
            if is_widget(type_, options):
                expected += [(name, entry, type_, options) for entry in widget_entries(name, type_, options)]
        values = node.get("widgets_values")
        values = [] if values is None else values
        assert isinstance(values, list), f"{where}: widgets_values is not a list"
        assert len(values) == len(expected), (
            f"{where}: {len(values)} widgets_values {values} for widgets {[(n, e) for n, e, _, _ in expected]}")
        for (name, entry, type_, options), value in zip(expected, values):
            if entry == "value":
                check_widget_value(f"{where}.{name}", type_, options, value)
            elif entry == "control":
                assert value in CONTROL_VALUES, f"{where}.{name}: control value {value!r} not in {sorted(CONTROL_VALUES)}"
