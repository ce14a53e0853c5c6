"""The package's layering, read from the source: which room may import which.

hf_lorafa is in rooms by concern, each a subpackage; the top level holds only the package face (`__init__`, which
only exports), the public TRL module (`trl`) and three leaves (`version`, `compat`, `redact`).

- No module imports the package face (`from hf_lorafa import …` / `from .. import Name`): `__init__` only exports.
- A room imports only the rooms below it (ROOMS), so the method core never learns of the trainer, the Hub or the CLI.
- The leaves import no hf-lorafa module but `compat`; `tuners.config` imports none at all.
- bitsandbytes is imported only by `tuners.quantization` (and `compat`, for its private helpers).
- Nothing in the package imports the lab (`research/`): tests/test_lab_boundary.py.
- `scripts/finetune.py`, the script users copy, uses only the public API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hf_lorafa"
LEAVES = {"version", "compat", "redact"}
# room -> the rooms and leaves it may import (besides itself)
ROOMS = {
    "tuners": {"compat", "version"},
    "adapter_io": {"tuners", "redact", "compat"},
    "data": {"tuners", "compat"},
    "memory": {"tuners", "data", "compat"},
    "hub": {"tuners", "adapter_io", "memory", "redact", "version"},
    "training": {"tuners", "adapter_io", "data", "memory", "hub", "compat", "redact", "version"},
    "cli": {"tuners", "adapter_io", "data", "memory", "hub", "training", "trl", "compat", "redact", "version"},
}
TOP_LEVEL = {"__init__", "trl", *LEAVES}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def package_imports(path: Path) -> set[str]:
    """The hf-lorafa modules `path` imports, as dotted names below `hf_lorafa` (an empty name: the package face)."""
    package = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                found.add(".".join((*base, node.module)))
            else:  # `from ..data import base_model` imports a module; `from .. import LoRAFAConfig` the face
                for alias in node.names:
                    target = PACKAGE.joinpath(*base, alias.name)
                    is_module = target.with_suffix(".py").exists() or target.is_dir()
                    found.add(".".join((*base, alias.name)) if is_module else ".".join(base))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_lorafa":
            found.add(node.module.removeprefix("hf_lorafa").lstrip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("hf_lorafa").lstrip(".") for a in node.names if a.name.startswith("hf_"))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_lives_in_a_room_or_is_named_top_level():
    stray = {module_name(p) for p in MODULES if p.parent == PACKAGE} - TOP_LEVEL
    assert not stray, f"top-level modules outside any room: {stray}"
    rooms = {p.parent.name for p in MODULES if p.parent != PACKAGE}
    assert rooms == set(ROOMS), f"rooms on disk {rooms} differ from the layering table {set(ROOMS)}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_module_imports_respect_the_layers(path):
    imports = package_imports(path)
    name = module_name(path)
    assert "" not in imports, f"{name} imports the package face"
    heads = {i.split(".")[0] for i in imports}
    if name in LEAVES:
        assert heads <= {"compat"} - {name}, f"leaf {name} imports {imports}"
    elif name == "tuners.config":
        assert not imports, f"tuners.config imports {imports}"
    elif path.parent != PACKAGE:
        room = path.parent.name
        assert heads <= ROOMS[room] | {room}, f"{name} ({room}) imports {sorted(heads - ROOMS[room] - {room})}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_only_the_quantization_module_imports_bitsandbytes(path):
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    if any(m.split(".")[0] == "bitsandbytes" for m in imported):
        assert module_name(path) in {"tuners.quantization", "compat"}


def test_finetune_script_uses_only_the_public_api():
    tree = ast.parse((REPO / "scripts" / "finetune.py").read_text())

    def modules(node: ast.AST) -> list[str]:
        if isinstance(node, ast.ImportFrom):
            return [node.module or ""]
        return [alias.name for alias in node.names] if isinstance(node, ast.Import) else []

    ours = [node for node in ast.walk(tree) if any(name.startswith("hf_lorafa") for name in modules(node))]
    assert ours and all(isinstance(node, ast.ImportFrom) and node.module == "hf_lorafa" for node in ours)
    import hf_lorafa

    assert all(alias.name in hf_lorafa.__all__ for node in ours for alias in node.names)
