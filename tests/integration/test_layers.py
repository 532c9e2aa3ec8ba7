"""The architecture's arrows, checked: every import (those under ``TYPE_CHECKING`` too) goes
from a layer to itself or to a layer before it, and no modules import each other in a cycle.

Layers, in import order: ``schedules`` (pure Python), ``swap`` (torch), then harmony's packages
``io``, ``model``, ``planning``, ``runtime``, ``parallel``, ``training``, ``tools``, and the
package's own ``harmony/__init__.py`` and ``__main__.py`` on top (README, "Layout").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["schedules", "swap", "harmony.io", "harmony.model", "harmony.planning",
          "harmony.runtime", "harmony.parallel", "harmony.training", "harmony.tools", "harmony"]


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("schedules", "swap", "harmony"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    """The index in LAYERS of the longest layer name ``module`` falls under."""
    best = max((name for name in LAYERS if module == name or module.startswith(name + ".")),
               key=len)
    return LAYERS.index(best)


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (a name imported from a package counts as that
    module when it is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_import_goes_to_an_earlier_layer() -> None:
    wrong = [f"{m} (layer {LAYERS[_layer(m)]}) imports {d} (layer {LAYERS[_layer(d)]})"
             for m, deps in sorted(_graph().items()) for d in sorted(deps)
             if _layer(d) > _layer(m) and not m.startswith("harmony.__")]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "modules importing each other in a cycle:\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_the_check_sees_the_project() -> None:
    """The walk finds every layer and the imports the layers are known to have (a check that
    found nothing would pass any layout)."""
    graph = _graph()
    assert {LAYERS[_layer(m)] for m in graph} == set(LAYERS)
    assert "harmony.runtime.pack" in graph["harmony.runtime.runtime"]
    assert "swap.engine" in graph["harmony.runtime.runtime"]
    assert "schedules.task" in graph["swap.engine"] or graph["schedules.task"] == set()


MAX_LINES = 500  # a module holds one idea; one this long holds several


def test_every_module_is_at_most_500_lines() -> None:
    """No module under ``schedules``, ``swap`` or ``harmony`` is over 500 lines; the message
    lists every one that is."""
    modules = _modules()
    assert {"schedules.task", "swap.nvme", "harmony.training.trainer"} <= set(modules)
    long = {m: n for m, p in modules.items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split each along its ideas):\n" + \
        "\n".join(f"{modules[m].relative_to(ROOT)}: {n} lines" for m, n in sorted(long.items()))
