"""The package's layering, read from the source: who may import whom.

- No module imports the package face (`from . import …`): `__init__` only exports.
- The leaves stay leaves: `bnb` (the only module importing bitsandbytes), `redact` (secret masking), `version`,
  `config` and `compat` import no hf-lorafa module but each other.
- The core (saving, loading, layers, injection) knows nothing of the Hub card.
- `scripts/finetune.py`, the script users copy, uses only the public API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hf_lorafa"
LEAVES = {"bnb", "redact", "version", "config", "compat"}
CORE = {"saving", "loading", "layers", "injection", "lamda", "methods"}


def package_imports(path: Path) -> set[str]:
    """The hf-lorafa modules `path` imports (relative imports, at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module)
            else:  # `from . import loading` imports a module; `from . import LoRAFAConfig` the package face
                found.update(a.name if (PACKAGE / f"{a.name}.py").exists() else f".{a.name}" for a in node.names)
    return found


MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_module_imports_respect_the_layers(path):
    imports = package_imports(path)
    assert not any(name.startswith(".") for name in imports), f"{path.name} imports the package face: {imports}"
    if path.stem in LEAVES:
        assert imports <= {"config", "compat"}, f"leaf {path.name} imports {imports}"
    if path.stem in CORE:
        assert not imports & {"model_card", "hub", "trainer", "job", "cli"}, f"core {path.name} imports {imports}"


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
