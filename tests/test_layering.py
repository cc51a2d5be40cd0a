"""The import structure, checked on the source with `ast` (no module is imported): the runtime core
imports nothing from training, the policy pipeline or the plugins, and no modules import each other
in a cycle (imports inside functions count too: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repo's folders as the package installs them (pyproject: package-dir).
PACKAGES = {"runtime": "blockpilot.runtime", "policy_export": "blockpilot.policy_export"}
# The runtime core: everything in runtime/ but the command line, the benchmark and drafter training.
NOT_CORE = {"blockpilot.runtime.cli", "blockpilot.runtime.bench"}
OUTSIDE_CORE = ("blockpilot.runtime.training", "blockpilot.policy_export", "blockpilot.plugins")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names of every module `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import blocks`
    return names


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: {m for m in imports_of(name, path) if m in found and m != name} for name, path in found.items()}


def test_the_runtime_core_imports_nothing_from_training_policy_export_or_plugins():
    bad = {}
    for name, path in modules().items():
        core = name.startswith("blockpilot.runtime.") and name not in NOT_CORE and not name.startswith(OUTSIDE_CORE)
        if core:
            wrong = sorted(m for m in imports_of(name, path) if m.startswith(OUTSIDE_CORE))
            if wrong:
                bad[name] = wrong
    assert not bad, f"runtime core modules import outside the core: {bad}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_relative_and_lazy_imports():
    edges = graph()
    assert "blockpilot.runtime.blocks" in edges["blockpilot.runtime.engine"]  # `from . import blocks`
    assert "blockpilot.runtime.target" in edges["blockpilot.runtime.drafter"]  # imported inside DFlashDraftModel.load
