"""The runtime's shape: every piece of its state has one owner (harmony/runtime/), helpers get
the owners they use and never the runtime, nothing outside the runtime reaches into it or sets
its attributes, its modules stay small, and its imports go one way (docs/design.md)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import harmony
from harmony.runtime.options import RuntimeOptions
from tests.integration.test_layers import LAYERS, _graph, _layer
from tests.models import TinyTransformer, cross_entropy_tokens, training_state_bytes
from tests.timing import fix_timing

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "harmony" / "runtime"
MAX_LINES = 500


def _sources(*folders: str) -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def test_runtime_and_parallel_modules_are_small() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _sources("harmony/runtime",
                                                                    "harmony/parallel")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_no_helper_receives_the_runtime() -> None:
    """Only the runtime's own methods, and the one object that makes and holds it under the
    current plan (the trainer's ``Built``), hold the runtime: helpers get the owners they use."""
    owner = ROOT / "harmony" / "training" / "built.py"
    wrong = []
    for path, tree in _sources("harmony").items():
        if path == owner:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for arg in args:
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if note.strip("'\"").split(".")[-1] in ("Runtime", "Runtime | None"):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg})")
    assert not wrong, "functions taking the runtime:\n" + "\n".join(wrong)


def _runtime_private_names() -> set[str]:
    """Private names the runtime package defines (methods, and attributes set on self)."""
    names = set()
    for tree in _sources("harmony/runtime").values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "self" and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _is_runtime(expr: ast.expr) -> bool:
    """Whether ``expr`` names a runtime as the code outside it does (``trainer._runtime``,
    ``runtime``, ``rt``) or reaches through one (``self._runtime.packs[0]``)."""
    text = ast.unparse(expr)
    return text.split(".")[-1] in RUNTIME_NAMES or any(
        f"{n}." in text or f"{n}[" in text for n in RUNTIME_NAMES)


RUNTIME_NAMES = ("_runtime", "runtime", "rt")


def test_nothing_outside_the_runtime_uses_its_private_names() -> None:
    private = _runtime_private_names()
    assert "_dispatch" in private  # (the walk sees the runtime's own privates)
    wrong = []
    for path, tree in _sources("harmony", "examples").items():
        if RUNTIME in path.parents:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private \
                    and _is_runtime(node.value):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, "private names of the runtime used outside it:\n" + "\n".join(wrong)


def test_nothing_sets_runtime_attributes_from_outside() -> None:
    """What the trainer or a pipeline rank decides is passed at construction (RuntimeOptions)
    or to run(); no module outside the runtime assigns to the runtime's attributes."""
    wrong = []
    for path, tree in _sources("harmony", "examples").items():
        if RUNTIME in path.parents:
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and _is_runtime(t.value):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(t)}")
    assert not wrong, "runtime attributes set from outside:\n" + "\n".join(wrong)


def test_runtime_options_are_frozen() -> None:
    options = RuntimeOptions(loss_fn=torch.nn.functional.mse_loss, device=torch.device("cpu"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1  # type: ignore[misc]


def test_the_runtime_imports_one_way() -> None:
    """The runtime imports only earlier layers (protocols stand for the parallel hooks it
    calls), the model layer imports nothing of the runtime, and no cycle runs through the
    runtime (imports under TYPE_CHECKING count)."""
    graph = _graph()
    runtime = LAYERS.index("harmony.runtime")
    wrong = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
             if (_layer(m) == runtime and _layer(d) > runtime)
             or (_layer(m) < runtime and _layer(d) == runtime)]
    assert not wrong, "\n".join(wrong)
    mine = [m for m in graph if _layer(m) == runtime]
    for start in mine:  # no module of the runtime reaches itself again
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"{start} imports itself through a cycle"
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])


def test_a_recorded_step_that_rehomes_records_its_tasks(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """record_step passes its record to the step's run: a step that re-plans onto new packs
    (so builds a new runtime) records its tasks too."""
    fix_timing(monkeypatch.setattr)  # (which packs the planner builds must not follow the load)
    model = TinyTransformer(length=16)
    state = training_state_bytes(model, 8)
    g = torch.Generator().manual_seed(5)
    x, long = torch.randint(0, 11, (4, 4), generator=g), torch.randint(0, 11, (4, 16), generator=g)
    with harmony.Trainer(model, cross_entropy_tokens, micro_batch_size=2,
                         device_memory=state // 3, host_memory=state // 2,
                         nvme_dir=tmp_path) as t:
        t.step(x, x.roll(-1, 1))
        built = t.runtime
        # Sequences four times longer need the room for activations: new packs.
        t.record_step(long, long.roll(-1, 1), tmp_path / "step.json")
        assert t.runtime is not built, "the longer batch was expected to re-home the packs"
        assert t.plan is not None
        tasks = json.loads((tmp_path / "step.json").read_text())["tasks"]
        assert [d["task"] for d in tasks] == [str(task) for task in t.plan.schedule.tasks]
