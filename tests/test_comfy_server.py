"""The pack installs into a real ComfyUI server the way users install it.

A throw-away ComfyUI base directory gets custom_nodes/ComfyUI-DreamCache as
a symlink to this checkout (nothing is copied, the ComfyUI checkout at
COMFYUI_PATH is not touched); ComfyUI's main.py is started on 127.0.0.1 with
that base directory, on the CPU. The test then reads what the frontend reads:
/object_info lists the nodes of the node contract (tests/node_contract.py) in
category "DreamCache" or its sub-categories with the contract's inputs and outputs, /workflow_templates lists
the example workflows, and the server log shows the pack imported cleanly.
"""
import json
import re

import pytest

from comfy_server import PACK_FOLDER_NAME, new_base_directory, running_server, tracebacks
from conftest import PACK_ROOT
from node_contract import CATEGORY, NODE_CONTRACT, in_pack_category

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running ComfyUI server with the pack installed (stopped after this module's tests)."""
    root = tmp_path_factory.mktemp("comfyui")
    with running_server(root, new_base_directory(root)) as running:
        yield running


def test_server_lists_the_contract_nodes_in_category_dreamcache(server):
    object_info = server.object_info
    ours = {name: info for name, info in object_info.items() if info.get("python_module", "").endswith(PACK_FOLDER_NAME)}
    missing = set(NODE_CONTRACT) - set(ours)
    assert not missing, f"the server does not list {sorted(missing)} from the pack (it lists {sorted(ours)})"
    for name in NODE_CONTRACT:
        assert in_pack_category(object_info[name]["category"]), f"{name} is in category {object_info[name]['category']}"
    for name, info in ours.items():  # nodes beyond the contract stay in the pack's menu too
        assert info["category"].split("/")[0] == CATEGORY, f"{name} is in category {info['category']}"


@pytest.mark.parametrize("node_id", sorted(NODE_CONTRACT))
def test_server_nodes_follow_the_node_contract(server, node_id):
    object_info = server.object_info
    assert node_id in object_info, f"the server does not list {node_id}"
    info = object_info[node_id]
    required, optional, outputs = NODE_CONTRACT[node_id]
    declared_required = info["input"].get("required", {})
    declared_optional = info["input"].get("optional", {})
    for name, type_ in required.items():
        assert name in declared_required, f"{node_id}: required input '{name}' is missing"
        declared = declared_required[name][0]
        assert (isinstance(declared, list) and type_ == "COMBO") or declared == type_, (
            f"{node_id}.{name} is {declared}, the contract says {type_}")
    assert set(declared_required) == set(required), f"{node_id}: required inputs {sorted(declared_required)}"
    assert optional <= set(declared_optional), f"{node_id}: optional inputs {sorted(declared_optional)}"
    assert list(info["output"]) == outputs
    assert info["display_name"] and info["display_name"] != node_id


def test_server_imported_the_pack_cleanly(server):
    log = server.log()
    pack_lines = [line for line in log.splitlines() if PACK_FOLDER_NAME in line]
    assert any(re.search(r"\d+\.\d+ seconds: .*" + re.escape(PACK_FOLDER_NAME), line) for line in pack_lines), (
        "the custom-node import summary does not list the pack:\n" + "\n".join(pack_lines))
    for marker in ("IMPORT FAILED", "PRESTARTUP FAILED", "Cannot import", "Skip "):
        bad = [line for line in pack_lines if marker in line]
        assert not bad, f"server log: {bad}"
    for block in tracebacks(log):
        assert PACK_FOLDER_NAME not in block and str(PACK_ROOT) not in block, f"traceback from the pack:\n{block}"
    assert "Unable to parse pyproject.toml" not in log, "ComfyUI could not read the pack's pyproject.toml"


def test_server_lists_the_example_workflows(server):
    templates = server.get("/workflow_templates")
    shipped = sorted(path.stem for path in (PACK_ROOT / "example_workflows").glob("*.json"))
    assert sorted(templates.get(PACK_FOLDER_NAME, [])) == shipped
    for name in shipped:
        served = server.get(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{name}.json")
        assert served == json.loads((PACK_ROOT / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))


def lists_model_with_folder(listing: str, name: str, folder: str) -> bool:
    """The listing names ``name`` with its ``folder``: "folder / name" (the dialog of frontends up to 1.3x) or a
    "name" line followed by a "folder" line (the Issues panel of newer ones)."""
    lines = [line.strip() for line in listing.splitlines() if line.strip()]
    return f"{folder} / {name}" in listing or any(
        line == name and following == folder for line, following in zip(lines, lines[1:]))


def test_frontend_names_each_missing_model_file_and_its_folder(server):
    """Opened on a server without the files, each example workflow makes the frontend list every missing
    checkpoint and SAM file with the folder it goes in (from the loaders' models metadata)."""
    from frontend_prompts import chromium_or_skip, missing_models_listings

    chromium = chromium_or_skip()
    paths = sorted((PACK_ROOT / "example_workflows").glob("*.json"))
    workflows = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in paths}
    listings = missing_models_listings(server.base_url, workflows, chromium)
    for name, workflow in workflows.items():
        expected = [(model["name"], model["directory"])
                    for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])]
        assert expected, f"{name}: no loader carries models metadata"
        for file_name, folder in expected:
            assert lists_model_with_folder(listings[name], file_name, folder), (
                f"{name}: the frontend's missing-models listing does not name {file_name} in {folder}:\n"
                f"{listings[name]}")
    # the SD2.1 example (the authors' adapter) asks for the SD2.1-base checkpoint, with its folder
    assert lists_model_with_folder(listings["dreamcache_sd21"], "v2-1_512-ema-pruned.safetensors", "checkpoints"), (
        listings["dreamcache_sd21"])
