"""The pack installs into a real ComfyUI server the way users install it.

A throw-away ComfyUI base directory gets custom_nodes/ComfyUI-DreamCache as
a symlink to this checkout (nothing is copied, the ComfyUI checkout at
COMFYUI_PATH is not touched); ComfyUI's main.py is started on 127.0.0.1 with
that base directory, on the CPU. The test then reads what the frontend reads:
/object_info lists the seven nodes of the node contract in category
"DreamCache" with the contract's inputs and outputs, /workflow_templates lists
the example workflows, and the server log shows the pack imported cleanly.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import PACK_ROOT, comfyui_path

PACK_FOLDER_NAME = "ComfyUI-DreamCache"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180
CATEGORY = "DreamCache"

# DESIGN.md section 4: required inputs (name -> type; "COMBO" for a list of choices), optional inputs, outputs.
NODE_CONTRACT = {
    "DreamCacheAdapterLoader": ({"adapter_name": "COMBO"}, set(), ["DREAMCACHE_ADAPTER"]),
    "DreamCacheSAMLoader": ({"model_name": "COMBO", "device": "COMBO"}, set(), ["SAM_MODEL"]),
    "DreamCacheMaskReference": ({"image": "IMAGE", "size": "INT"}, {"sam_model", "mask"}, ["IMAGE", "MASK"]),
    "DreamCacheEncode": ({"model": "MODEL", "reference": "LATENT", "conditioning": "CONDITIONING", "seed": "INT"},
                         {"mask"}, ["DREAMCACHE"]),
    "DreamCacheApply": ({"model": "MODEL", "adapter": "DREAMCACHE_ADAPTER", "cache": "DREAMCACHE", "strength": "FLOAT",
                         "start_percent": "FLOAT", "end_percent": "FLOAT", "apply_to": "COMBO"},
                        {"attn_mask", "reference_mode", "reference_weights", "middle_weight", "decoder_weight",
                         "layer_weights"}, ["MODEL"]),
    "DreamCacheSave": ({"cache": "DREAMCACHE", "filename_prefix": "STRING"}, set(), []),
    "DreamCacheLoad": ({"cache_name": "COMBO"}, set(), ["DREAMCACHE"]),
    # issue 4: combined guidance and several references
    "DreamCacheGuider": ({"model": "MODEL", "adapter": "DREAMCACHE_ADAPTER", "cache": "DREAMCACHE",
                          "positive": "CONDITIONING", "negative": "CONDITIONING", "text_cfg": "FLOAT",
                          "image_cfg": "FLOAT"}, {"attn_mask", "reference_mode", "reference_weights"}, ["GUIDER"]),
    "DreamCacheCombine": ({"cache_1": "DREAMCACHE", "cache_2": "DREAMCACHE", "weight_1": "FLOAT", "weight_2": "FLOAT"},
                          set(), ["DREAMCACHE"]),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def wait_for_object_info(process, base_url: str, log_path: Path):
    """/object_info once the server answers; None if the process ended first. Fails after STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            return get_json(f"{base_url}/object_info", timeout=30.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(1.0)
    pytest.fail(f"ComfyUI did not answer /object_info within {STARTUP_TIMEOUT_S} s. Log:\n{tail(log_path)}")


def tail(log_path: Path, lines: int = 80) -> str:
    return "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def tracebacks(log: str):
    """Each traceback in the log with the message lines that follow it."""
    return re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*", log)


def stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


class Server:
    def __init__(self, base_url: str, object_info: dict, log_path: Path):
        self.base_url, self.object_info, self.log_path = base_url, object_info, log_path

    def get(self, path: str):
        return get_json(self.base_url + path)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running ComfyUI server with the pack installed (stopped after this module's tests)."""
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("COMFYUI_PATH is not set: this test needs a ComfyUI checkout")
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfy} is not a ComfyUI checkout (no main.py)")
    root = tmp_path_factory.mktemp("comfyui")
    base = root / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    port = free_port()
    base_url = f"http://{HOST}:{port}"
    command = [
        sys.executable, str(comfy / "main.py"),
        "--cpu", "--use-pytorch-cross-attention",
        "--listen", HOST, "--port", str(port),
        "--base-directory", str(base),  # models, custom_nodes, input, output, temp, user all under tmp
        "--database-url", "sqlite:///:memory:",  # the default database lives inside the checkout
        "--disable-auto-launch",
        # Only this pack, even if an extra_model_paths.yaml adds other custom_nodes folders.
        "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER_NAME,
    ]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    log_path = root / "server.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            object_info = wait_for_object_info(process, base_url, log_path)
            if object_info is None:
                log = log_path.read_text(encoding="utf-8", errors="replace")
                missing = re.findall(r"ModuleNotFoundError: No module named '([^']+)'", log)
                if missing and PACK_FOLDER_NAME not in log:
                    pytest.skip(f"ComfyUI at {comfy} stops before loading any custom node: this Python lacks the "
                                f"module {missing[-1]!r} that ComfyUI imports (install ComfyUI's requirements.txt, "
                                f"and 'requests', which its server imports without listing it). "
                                f"Log:\n{tail(log_path, 15)}")
                pytest.fail(f"ComfyUI exited with code {process.returncode} before serving. Log:\n{tail(log_path)}")
            yield Server(base_url, object_info, log_path)
        finally:
            stop(process)


def test_server_lists_the_contract_nodes_in_category_dreamcache(server):
    object_info = server.object_info
    ours = {name: info for name, info in object_info.items() if info.get("python_module", "").endswith(PACK_FOLDER_NAME)}
    missing = set(NODE_CONTRACT) - set(ours)
    assert not missing, f"the server does not list {sorted(missing)} from the pack (it lists {sorted(ours)})"
    for name in NODE_CONTRACT:
        assert object_info[name]["category"] == CATEGORY, f"{name} is in category {object_info[name]['category']}"
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
