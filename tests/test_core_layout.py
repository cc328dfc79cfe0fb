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


# ----------------------------------------------------------------------------------------------------------------
# the layers: a module imports its own layer and the layers below it, never one above (README, "how the pack is
# laid out")
# ----------------------------------------------------------------------------------------------------------------

LAYERS = (
    ("method", "data"),  # the method in plain torch; the shipped prompt and subject lists
    ("io", "masking"),  # files (adapters, images, models' paths); reference masks, SAM
    ("comfy_bridge",),  # the only core code that reaches ComfyUI
    ("training",),  # data, loss, loop, `train`
    ("evaluation",),  # generation, metrics, the benchmarks (also of training)
    ("toy",),  # the CPU-sized world and benchmark
    ("nodes",),  # ComfyUI glue
)
LAYER_OF = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
def module_name(path: Path) -> tuple:
    """("dreamcache_core", "method", "patch") of a file under the pack; a package is its __init__'s folder."""
    parts = path.relative_to(PACK_ROOT).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def layer_of(module: tuple):
    """The layer package of a module of the pack ("method", ..., "nodes"), or None outside the layers."""
    if module[:1] == ("nodes",):
        return "nodes"
    if module[:1] == ("dreamcache_core",) and len(module) > 1 and module[1] in LAYER_OF:
        return module[1]
    return None


def pack_imports(path: Path, module: tuple = None) -> list:
    """(line, imported module) of every import of the pack's own modules in ``path``: at module level and inside
    functions, relative imports resolved against ``module`` (the file's own dotted name, default from its path).
    ``from . import x`` counts as importing the module ``x`` of that package."""
    module = module_name(path) if module is None else module
    package = module if path.name == "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue  # the pack imports itself relatively (its folder name is not a fixed package name)
        base = package[:len(package) - (node.level - 1)]
        if node.module:
            found.append((node.lineno, base + tuple(node.module.split("."))))
        else:
            found += [(node.lineno, base + (alias.name,)) for alias in node.names]
    return found


def upward_imports(paths) -> dict:
    """{file: [(line, imported module, its layer)]} of imports that reach a layer above the file's own."""
    offenders = {}
    for path in paths:
        own = layer_of(module_name(path))
        if own is None:
            continue
        for line, imported in pack_imports(path):
            other = layer_of(imported)
            if other is not None and LAYER_OF[other] > LAYER_OF[own]:
                offenders.setdefault(str(path.relative_to(PACK_ROOT)), []).append(
                    (line, ".".join(imported), other))
    return offenders


def pack_modules() -> list:
    return sorted(list(CORE.rglob("*.py")) + list((PACK_ROOT / "nodes").rglob("*.py")))


def test_no_module_imports_a_layer_above_its_own():
    offenders = upward_imports(pack_modules())
    order = " <- ".join("/".join(packages) for packages in LAYERS)
    assert not offenders, (f"these modules import a layer above their own (the layers, lowest first: {order}); "
                           f"move what they need down, or pass it in from above: {offenders}")


def function_level_pack_imports(path: Path, module: tuple = None) -> list:
    """(line, imported module) of the pack's own modules imported inside a function body of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    inside = {node.lineno for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function) if isinstance(node, ast.ImportFrom)}
    return [(line, imported) for line, imported in pack_imports(path, module) if line in inside]


def test_the_pack_imports_its_own_modules_at_module_level():
    """Inside functions the pack imports only ComfyUI and heavy optional packages (segment_anything,
    transformers, tensorboard, pyarrow, ...), never its own modules: the imports at the top of a module say what
    it builds on."""
    offenders = {}
    for path in pack_modules():
        found = function_level_pack_imports(path)
        if found:
            offenders[str(path.relative_to(PACK_ROOT))] = [(line, ".".join(module)) for line, module in found]
    assert not offenders, f"move these imports of the pack's own modules to the top of their module: {offenders}"


def test_every_layer_package_has_a_layer():
    """A new package under dreamcache_core must be placed in LAYERS (and in the README's layout)."""
    packages = {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYER_OF) - {"nodes"}


def test_the_layer_scan_resolves_relative_imports_at_every_depth(tmp_path):
    """The scan finds module-level and function-level imports, resolves ``.``, ``..`` and ``from . import x``,
    and flags exactly the upward ones."""
    folder = tmp_path / "dreamcache_core" / "io"
    folder.mkdir(parents=True)
    sample = folder / "sample.py"
    sample.write_text("from ..method.cache import DreamCache\nfrom . import image_files\nimport numpy\n"
                      "def f():\n    from ..training.train import main\n    from ...nodes import apply\n"
                      "    from .model_paths import existing_file\n")
    module = ("dreamcache_core", "io", "sample")
    assert pack_imports(sample, module) == [
        (1, ("dreamcache_core", "method", "cache")), (2, ("dreamcache_core", "io", "image_files")),
        (5, ("dreamcache_core", "training", "train")), (6, ("nodes",)),
        (7, ("dreamcache_core", "io", "model_paths"))]
    ranks = [LAYER_OF[layer_of(imported)] - LAYER_OF["io"] for _, imported in pack_imports(sample, module)]
    assert [rank > 0 for rank in ranks] == [False, False, True, True, False]
    assert [line for line, _ in function_level_pack_imports(sample, module)] == [5, 6, 7]
