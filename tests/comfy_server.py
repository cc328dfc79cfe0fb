"""A real ComfyUI server on 127.0.0.1 with this pack installed the way users install it.

A throw-away ComfyUI base directory gets custom_nodes/ComfyUI-DreamCache as a
symlink to this checkout (nothing is copied, the ComfyUI checkout at
COMFYUI_PATH is not touched); ComfyUI's main.py is started on 127.0.0.1 with
that base directory, on the CPU, with only this pack's custom nodes.
"""
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import PACK_ROOT, comfyui_path

PACK_FOLDER_NAME = "ComfyUI-DreamCache"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def request_json(url: str, body=None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {} if body is None else {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


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


class PromptFailed(AssertionError):
    pass


class Server:
    def __init__(self, base_url: str, object_info: dict, log_path: Path, process, base: Path):
        self.base_url, self.object_info, self.log_path, self.process, self.base = (
            base_url, object_info, log_path, process, base)

    def get(self, path: str):
        return request_json(self.base_url + path)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def queue(self, prompt: dict) -> str:
        """POST /prompt; the prompt id. A prompt ComfyUI refuses at validation fails with its node errors."""
        try:
            answer = request_json(self.base_url + "/prompt", {"prompt": prompt, "client_id": "dreamcache-tests"})
        except urllib.error.HTTPError as error:
            raise PromptFailed(f"ComfyUI refused the prompt: {error.read().decode('utf-8', 'replace')}") from error
        if answer.get("node_errors"):
            raise PromptFailed(f"ComfyUI refused the prompt: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    def wait_for(self, prompt_id: str, timeout_s: float) -> dict:
        """The /history entry of a finished prompt; fails with ComfyUI's error and the log if it failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PromptFailed(f"ComfyUI exited (code {self.process.returncode}). Log:\n{tail(self.log_path)}")
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise PromptFailed(f"The prompt failed: {json.dumps(errors, indent=1)[:6000]}\n"
                                       f"Log:\n{tail(self.log_path, 40)}")
                return entry
            time.sleep(1.0)
        raise PromptFailed(f"The prompt did not finish within {timeout_s:.0f} s. Log:\n{tail(self.log_path)}")

    def run(self, prompt: dict, timeout_s: float) -> dict:
        return self.wait_for(self.queue(prompt), timeout_s)

    def image(self, reference: dict):
        """An image an output node lists in /history, as a uint8 array [H, W, C]."""
        import numpy as np
        from PIL import Image

        query = urllib.parse.urlencode({k: reference.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.base_url}/view?{query}", timeout=30) as response:
            return np.array(Image.open(io.BytesIO(response.read())))


def wait_for_object_info(process, base_url: str, log_path: Path):
    """/object_info once the server answers; None if the process ended first. Fails after STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            return request_json(f"{base_url}/object_info", timeout=30.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(1.0)
    pytest.fail(f"ComfyUI did not answer /object_info within {STARTUP_TIMEOUT_S} s. Log:\n{tail(log_path)}")


def new_base_directory(root: Path) -> Path:
    """A ComfyUI base directory (models, input, output, user, custom_nodes) with the pack linked in."""
    base = root / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    return base


def require_comfyui() -> Path:
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("COMFYUI_PATH is not set: this test needs a ComfyUI checkout")
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfy} is not a ComfyUI checkout (no main.py)")
    return comfy


def frontend_arguments() -> list:
    """``--front-end-root`` of DREAMCACHE_FRONTEND_ROOT (a frontend's static folder, e.g. the ``static`` folder
    of an unpacked comfyui-frontend-package wheel), so the tier can check another frontend than the one
    installed with ComfyUI; none when it is unset."""
    folder = os.environ.get("DREAMCACHE_FRONTEND_ROOT")
    if not folder:
        return []
    if not (Path(folder) / "index.html").is_file():
        pytest.fail(f"DREAMCACHE_FRONTEND_ROOT={folder} is not a frontend folder (no index.html): point it at the "
                    "'static' folder of an unpacked comfyui-frontend-package wheel")
    return ["--front-end-root", str(Path(folder).resolve())]


@contextlib.contextmanager
def running_server(root: Path, base: Path):
    """Start ComfyUI's main.py on a free port of 127.0.0.1 with ``base``; a Server until the block ends."""
    comfy = require_comfyui()
    port = free_port()
    base_url = f"http://{HOST}:{port}"
    command = [
        sys.executable, str(comfy / "main.py"),
        "--cpu", "--use-pytorch-cross-attention",
        "--listen", HOST, "--port", str(port),
        "--base-directory", str(base),  # models, custom_nodes, input, output, temp, user all under root
        "--database-url", "sqlite:///:memory:",  # the default database lives inside the checkout
        "--disable-auto-launch",
        # Only this pack, even if an extra_model_paths.yaml adds other custom_nodes folders.
        "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER_NAME,
    ] + frontend_arguments()
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
            yield Server(base_url, object_info, log_path, process, base)
        finally:
            stop(process)
