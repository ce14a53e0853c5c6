"""The lab stands outside the library: research/ uses only hf-lorafa's public names and patches no path, the library
and the user-facing scripts import nothing from research/, and the wheel ships none of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hf_lorafa

REPO = Path(__file__).resolve().parent.parent
RESEARCH = sorted((REPO / "research").rglob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


@pytest.mark.parametrize("path", RESEARCH, ids=[str(p.relative_to(REPO)) for p in RESEARCH])
def test_research_uses_only_the_public_api(path):
    ours = [(module, names) for module, names in imports(path) if module.split(".")[0] == "hf_lorafa"]
    assert all(module == "hf_lorafa" for module, _ in ours), f"{path.name} imports a hf_lorafa module: {ours}"
    private = [n for _, names in ours for n in names if n not in hf_lorafa.__all__]
    assert not private, f"{path.name} imports names outside hf_lorafa.__all__: {private}"
    tree = ast.parse(path.read_text())
    patched = [
        n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path" and ast.unparse(n) == "sys.path"
    ]
    assert not patched, f"{path.name} patches sys.path"


def test_library_and_scripts_import_nothing_from_research():
    sources = [*(REPO / "hf_lorafa").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    offenders = [p.name for p in sources if any(m.split(".")[0] == "research" for m, _ in imports(p))]
    assert offenders == []
