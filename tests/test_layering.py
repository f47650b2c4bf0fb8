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


def _module_graph() -> dict[str, set[str]]:
    """qwen35c module -> the qwen35c modules it imports, at any depth of the file (lazy imports too)."""
    files = {}
    for path in (ROOT / "qwen35c").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in files:
                return ".".join(parts[:i])
        return None

    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges.update(r for r in map(resolve, targets) if r and r != name)
        graph[name] = edges
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    """Arrows point down only: commands -> build/verify -> runtime/backends -> artifact -> graph/passes/quant.
    The one allowed cycle: the IR and its text form (`Graph.__str__` prints through graph.text)."""
    graph = _module_graph()
    allowed = {frozenset({"qwen35c.graph.ir", "qwen35c.graph.text"})}
    cycles = sorted(tuple(sorted({a, b})) for a in graph for b in graph[a]
                    if a in _reachable(graph, b) and frozenset({a, b}) not in allowed)
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_layers():
    graph = _module_graph()
    rules = {  # module prefix -> prefixes it must never reach
        # the artifact format may ask the backend registry (qwen35c.backends) for names, no backend code
        "qwen35c.artifact": ("qwen35c.backends.", "qwen35c.runtime", "qwen35c.verify", "qwen35c.build",
                             "qwen35c.commands", "qwen35c.eval"),
        "qwen35c.backends": ("qwen35c.verify", "qwen35c.build", "qwen35c.commands"),
        "qwen35c.runtime": ("qwen35c.verify", "qwen35c.build", "qwen35c.commands", "qwen35c.eval"),
        "qwen35c.verify": ("qwen35c.build", "qwen35c.commands"),
    }
    bad = [(m, r) for m in graph for prefix, banned in rules.items() if m.startswith(prefix)
           for r in _reachable(graph, m) if r.startswith(banned)]
    assert not bad, f"layering violated: {bad[:5]}"
