"""The import rules of docs/design.md ("Layers"), read from the source: a package imports only
packages below it, lazy imports inside functions included, and no two modules import each
other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: Top to bottom: a package may import those after it in this list (and itself).
LAYERS = ["cli|api|client|workers", "service", "pipeline", "host", "store", "core"]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names.split("|")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of rgrid/ and workers/ with the rgrid and workers modules it imports,
    anywhere in its body."""
    files = [*ROOT.joinpath("rgrid").rglob("*.py"), *ROOT.joinpath("workers").glob("*.py")]
    known = {_module_name(path): path for path in files}
    found: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in known:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        found[name] = targets
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


IMPORTS = _imports()


def test_the_graph_was_read():
    assert "rgrid.pipeline.chain" in IMPORTS
    assert "rgrid.core.config" in IMPORTS["rgrid.pipeline.context"]


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _layer(m)))
def test_imports_point_down(module):
    here = RANK[_layer(module)]
    upward = sorted(t for t in IMPORTS[module] if _layer(t) and RANK[_layer(t)] < here)
    assert not upward, f"{module} imports {upward}, above it in docs/design.md's layers"


def test_no_two_modules_import_each_other():
    circles = sorted(
        (a, b) for a, targets in IMPORTS.items() for b in targets if a < b and a in IMPORTS[b]
    )
    assert not circles
