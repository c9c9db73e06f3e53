"""The package's rooms: imports run down only, never in a circle (read from the source with ``ast``).

Rooms, top to bottom (an import may only go to the same room or a lower one; ``__init__`` modules re-export
their room and count as it)::

    entry points   admmcompress (package root), __main__, cli, api, run_export, run_hardware, deprecated aliases
    train          the reference loop, runner, config, checkpoints
    drivers, executors, report, hardware
    finalize       masks, quantized masks, hard prune
    plan           Plan, Rule, Target, coupled resolution, dependency graph
    structures     what a layer may look like (projections), and encoding (storage formats of the GEMM view)
    foundations    models, data, atomic writes, plugins, timing, config keys

Imports inside functions count (a lazy import is still an arrow). The test fails with the offending arrows
named, so a new module either fits a room or the room table is changed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "admmcompress"
ROOT = "admmcompress"

# Lower number = higher room.
ROOMS: dict[str, int] = {
    "": 0, "__main__": 0, "cli": 0, "api": 0, "run_export": 0, "run_hardware": 0, "command_locks": 0,
    "masks": 0, "quantize": 0, "graph": 0, "targets": 0,
    "train": 1,
    "drivers": 2, "executors": 2, "report": 2, "hardware": 2,
    "finalize": 3,
    "plan": 4,
    "structures": 5, "encoding": 5,
    "models": 6, "data": 6, "atomic": 6, "plugins": 6, "deprecation": 6, "timing": 6, "strict_yaml": 6,
    "config_keys": 6, "cpu_caches": 6, "messages": 6, "module_swap": 6,
}
# Top-level modules kept only as deprecated aliases of new homes: nothing inside the package may use them.
ALIASES = {"masks", "quantize", "graph", "targets"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOT, *parts])


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in the file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith(ROOT) and target in modules:
                found.add(target)
    found.discard(name)
    return found


def room_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_is_in_a_room():
    unknown = sorted({room_of(m) for m in all_modules()} - set(ROOMS))
    assert not unknown, f"modules outside the room table: {unknown}; add them to ROOMS in this test"


def test_imports_run_down_only():
    upward = []
    for source, targets in graph().items():
        for target in targets:
            if ROOMS[room_of(target)] < ROOMS[room_of(source)]:
                upward.append(f"{source} -> {target}")
    assert not upward, "imports from a lower room to an upper one:\n" + "\n".join(sorted(upward))


def test_nothing_inside_uses_the_deprecated_alias_modules():
    users = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if room_of(target) in ALIASES and source.count(".") >= 1 and room_of(source) not in ALIASES
        and len(target.split(".")) == 2
    ]
    assert not users, "package modules importing deprecated aliases:\n" + "\n".join(sorted(users))


def test_no_import_cycles():
    # A package's __init__ re-exporting its own submodules is not a circle of design (Python runs the
    # parent before the child anyway); every other edge counts.
    edges = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
