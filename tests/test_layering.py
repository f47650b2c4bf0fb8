"""Layering rules of the design: `reference/` is the ground truth and imports nothing from `qwen35c`;
the product never imports the test-only oracle `transformers`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_reference_imports_nothing_from_qwen35c():
    offenders = [p.name for p in (ROOT / "reference").glob("*.py") if "qwen35c" in _imports(p)]
    assert not offenders, f"reference/ must not import qwen35c: {offenders}"


def test_product_does_not_import_transformers():
    files = list((ROOT / "qwen35c").rglob("*.py")) + list((ROOT / "reference").glob("*.py"))
    offenders = [str(p.relative_to(ROOT)) for p in files if "transformers" in _imports(p)]
    assert not offenders, f"transformers is a test-only dependency: {offenders}"
