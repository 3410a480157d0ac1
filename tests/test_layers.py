"""Imports go one way (docs/architecture.md, section 1): ops, then losses, then the four middle
folders (models, data, rewards, rollout, which may import each other), then methods, then the CLI.
A folder never imports from a folder below it; `lit_align/imports.py` is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_align"
MIDDLE = {"models", "data", "rewards", "rollout"}
ALLOWED = {
    "ops": set(),
    "losses": {"ops"},
    **{m: {"ops", "losses", "imports", *MIDDLE} for m in MIDDLE},
    "methods": {"ops", "losses", "imports", "optim", *MIDDLE},
    "imports": set(),
}


def lit_align_imports(path: Path) -> set[str]:
    """The top-level names under lit_align that a file imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n.split(".")[1] for n in names if n.startswith("lit_align.")}
    return found


def test_imports_go_one_way():
    wrong = []
    for layer, allowed in ALLOWED.items():
        files = [PACKAGE / f"{layer}.py"] if (PACKAGE / f"{layer}.py").exists() else sorted((PACKAGE / layer).rglob("*.py"))
        assert files, layer
        for path in files:
            for target in lit_align_imports(path) - allowed - {layer}:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports lit_align.{target}")
    assert not wrong, "\n".join(wrong)
