"""The pack's layout holds: dreamcache_core reaches ComfyUI only through its bridge package.

Every core module outside dreamcache_core/comfy_bridge/ must be importable without ComfyUI and must not import
any of ComfyUI's modules, at module level or inside a function; nodes/ is ComfyUI glue and may.
"""
import ast
from pathlib import Path

from conftest import PACK_ROOT

CORE = PACK_ROOT / "dreamcache_core"
BRIDGE = CORE / "comfy_bridge"
# ComfyUI's top-level modules and packages (what `import X` finds in a ComfyUI checkout).
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_execution", "comfy_config",
                   "folder_paths", "nodes", "execution", "server", "comfyui_version", "latent_preview",
                   "node_helpers", "cuda_malloc", "app", "middleware", "protocol", "new_updater"}


def comfyui_imports(path: Path) -> list:
    """(line, module) of every import of a ComfyUI module in ``path``, including importlib.import_module("...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        found += [(node.lineno, name) for name in names if name.split(".")[0] in COMFYUI_MODULES]
    return found


def test_only_the_bridge_imports_comfyui():
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        if BRIDGE in path.parents:
            continue
        imports = comfyui_imports(path)
        if imports:
            offenders[str(path.relative_to(PACK_ROOT))] = imports
    assert not offenders, ("these core modules import ComfyUI themselves; reach it through "
                           f"dreamcache_core/comfy_bridge instead: {offenders}")


def test_the_bridge_and_the_check_see_comfyui_imports():
    """The scan finds what it is for: the bridge imports ComfyUI (inside functions), and a fake module's three
    kinds of import are all found."""
    assert any(comfyui_imports(path) for path in BRIDGE.glob("*.py"))
    for path in BRIDGE.glob("*.py"):  # ... never at module level, so the core imports without ComfyUI
        module_level = [n for n in ast.parse(path.read_text(encoding="utf-8")).body
                        if isinstance(n, (ast.Import, ast.ImportFrom)) and n.__dict__.get("level", 0) == 0
                        and (getattr(n, "module", None) or n.names[0].name).split(".")[0] in COMFYUI_MODULES]
        assert not module_level, f"{path.name} imports ComfyUI at module level"


def test_the_scan_finds_every_kind_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import comfy.sd\nfrom folder_paths import x\ndef f():\n    import importlib\n"
                      "    return importlib.import_module('nodes')\nfrom .nodes import y\nimport numpy\n")
    assert [name for _, name in comfyui_imports(sample)] == ["comfy.sd", "folder_paths", "nodes"]
