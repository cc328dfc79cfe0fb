"""Test set-up shared by every test.

The pack is imported as the package ``comfyui_dreamcache`` (ComfyUI owns a
top-level ``nodes`` module, so ours must never be imported as ``nodes``).  The
pack's own ``__init__`` (ComfyUI's entry point) is not executed here: it needs
ComfyUI, and the server test loads it the way ComfyUI does.

ComfyUI-dependent tests use the ``comfy`` fixture: it skips, saying why, when
``COMFYUI_PATH`` is unset, and otherwise puts the checkout on ``sys.path`` with
the CPU and PyTorch attention selected before ``comfy`` is first imported.

Every test that needs ComfyUI carries the ``comfy`` marker (``pytestmark`` in the
test_comfy_*.py modules, per test elsewhere), so ``pytest -m "not comfy"`` runs
exactly the tests CI can run; a test that reaches for ComfyUI without it fails
with a message saying to add it.
"""
import os
import sys
import types
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "comfyui_dreamcache"


def _register_pack_package():
    if PACKAGE_NAME in sys.modules:
        return
    package = types.ModuleType(PACKAGE_NAME)
    package.__path__ = [str(PACK_ROOT)]
    package.__file__ = str(PACK_ROOT / "__init__.py")
    sys.modules[PACKAGE_NAME] = package
    # pytest sets up the repository root (it has an __init__.py) as a package named after its folder;
    # give it this same, inert module so ComfyUI's entry point is not run outside ComfyUI.
    sys.modules.setdefault(PACK_ROOT.name, package)


_register_pack_package()


_RUNNING = {"item": None}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Remember the test being set up: its fixtures (also module-scoped ones) may ask for ComfyUI."""
    _RUNNING["item"] = item


def require_comfy_marker():
    """Fail the running test unless it is marked ``comfy`` (checked before any skip, so CI catches it too)."""
    item = _RUNNING["item"]
    if item is not None and item.get_closest_marker("comfy") is None:
        pytest.fail(f"{item.nodeid} needs ComfyUI but is not marked: add @pytest.mark.comfy to the test (or "
                    "pytestmark = pytest.mark.comfy to a test_comfy_*.py module), so that -m 'not comfy' leaves it "
                    "out", pytrace=False)


def comfyui_path():
    """The ComfyUI checkout of COMFYUI_PATH (None when unset); only for tests marked ``comfy``."""
    require_comfy_marker()
    path = os.environ.get("COMFYUI_PATH")
    return Path(path).resolve() if path else None


def import_comfy():
    """Make ComfyUI importable (CPU, PyTorch attention) and return its path."""
    path = comfyui_path()
    if path is None:
        pytest.skip("COMFYUI_PATH is not set: this test needs a ComfyUI checkout")
    if not (path / "comfy" / "model_management.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_management.py)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        args.use_pytorch_cross_attention = True
        args.disable_all_custom_nodes = True
    return path


@pytest.fixture
def comfy():
    return import_comfy()
