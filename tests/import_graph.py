"""The package's import graph (from the source, with ast) and the rules it must follow.

Stages, lowest first. A module may import its own package's modules (subject to the
package's own order below) and modules of strictly lower stages; never a module of its own
stage in another package (model and data are independent, so are training and convert),
never one of a higher stage. There are no cycles, counting every import: top-level, inside
functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import os
from typing import Optional

PACKAGE = "megatron_llama"

STAGES = {
    "errors": 0,
    "fileio": 1, "checkpoint_files": 1, "process_tuning": 1, "local_ranks": 1,
    "compat": 2, "resilience": 2,
    "model": 3, "data": 3,
    "parallel": 4,
    "training": 5, "convert": 5,
    "generate": 6, "launch": 6, "finetune": 6, "evaluate": 6,
    "selfcheck": 7, "bench": 7,
    "cli": 8,
}

# Order inside a package: a module may import only modules of its own or an earlier group.
INNER_ORDER = {
    "training": [("recipe", "memory", "metrics", "plot"), ("engines",), ("loop",),
                 ("commands",)],
}


def module_files(root: str) -> dict[str, str]:
    """{dotted module name: path} of every .py file under the package directory ``root``."""
    out = {}
    base = os.path.dirname(os.path.abspath(root))
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def import_graph(root: str) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, every import statement counted."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    parts = name.split(".")
                    keep = len(parts) - node.level + (1 if is_package else 0)
                    base = ".".join(parts[:keep] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _unit(module: str) -> str:
    """The stage unit of a module: its top-level package or module under the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _inner_group(module: str) -> Optional[int]:
    parts = module.split(".")
    order = INNER_ORDER.get(parts[1]) if len(parts) > 2 else None
    if order is None:
        return None
    for i, group in enumerate(order):
        if parts[2] in group:
            return i
    return None


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up or sideways between stages, or against a package's inner order."""
    problems = []
    for source, targets in sorted(graph.items()):
        a = _unit(source)
        for target in sorted(targets):
            b = _unit(target)
            if a == "" or b == "":
                continue  # the package's own __init__
            if a not in STAGES or b not in STAGES:
                problems.append(f"{source} -> {target}: {a if a not in STAGES else b} has no "
                                "stage (add it to STAGES)")
            elif a == b:
                ga, gb = _inner_group(source), _inner_group(target)
                if ga is not None and gb is not None and gb > ga:
                    problems.append(f"{source} -> {target}: against {PACKAGE}.{a}'s order")
            elif STAGES[b] >= STAGES[a]:
                kind = "sideways" if STAGES[b] == STAGES[a] else "upward"
                problems.append(f"{source} -> {target}: {kind} import (stage {STAGES[a]} "
                                f"{a} -> stage {STAGES[b]} {b})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def report(root: str) -> list[str]:
    """Every rule broken by the package at ``root``: cycles first, then directions."""
    graph = import_graph(root)
    return ([f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
            + direction_violations(graph))


def main() -> int:
    """``python -m tests.import_graph``: the stages with their modules, then every violation."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
    graph = import_graph(root)
    edges = sum(len(t) for t in graph.values())
    by_stage: dict[int, list[str]] = {}
    for unit, stage in STAGES.items():
        by_stage.setdefault(stage, []).append(unit)
    for stage in sorted(by_stage):
        units = by_stage[stage]
        count = sum(1 for m in graph if _unit(m) in units)
        print(f"stage {stage}: {', '.join(units)} ({count} modules)")
    problems = report(root)
    print(f"{len(graph)} modules, {edges} imports inside the package, "
          f"{len(cycles(graph))} cycles, {len(problems)} violations")
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
