"""One request value for the planner (harmony/planning/request.py), a plan that serializes
itself (harmony/planning/plan.py), and the layers' arrows among the packages that plan, run
in parallel, train and report."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harmony.planning.plan import Plan
from harmony.planning.planner import plan
from harmony.planning.profile import LayerProfile
from harmony.planning.request import PlanRequest
from harmony.tools.report import plan_to_json
from schedules.placement import Placement
from schedules.task import Loc
from tests.integration.test_layers import LAYERS, ROOT, _graph, _layer

BW = {"host->device": 1e9, "device->host": 1e9}


def _layers(n: int = 6) -> list[LayerProfile]:
    return [LayerProfile(f"l{i}", 40_000, 40_000, 2_000.0, 2_000.0, 6_000.0, 2_000.0,
                         1e-4, 3e-4, samples=4, fwd_group_s=0.6e-4, group_samples=8,
                         params=[(30_000, 30_000), (10_000, 10_000)]) for i in range(n)]


def _request(**fields: object) -> PlanRequest:
    request = PlanRequest(_layers(), "harmony", [4] * 4, 250_000, 1_500_000, 2.0, BW)
    return dataclasses.replace(request, **fields)  # type: ignore[arg-type]


def test_a_request_plans_as_its_fields_do() -> None:
    """``plan(request)`` is ``plan(*fields)``, for settings that take each path of the
    search: budgets that force swapping, NVMe with chunked updates, forward groups, tied
    weights, overlapped updates."""
    for fields in ({}, {"nvme": True, "update_chunk": "auto"}, {"forward_group": None},
                   {"tied": [((0, 5), 40_000)]}, {"overlap_updates": True, "nvme": True}):
        request = _request(**fields)
        chosen = plan(request)
        assert chosen == plan(_layers(), "harmony", [4] * 4, 250_000, 1_500_000, 2.0, BW,
                              **fields)  # type: ignore[arg-type]
        assert chosen.predicted.peak[Loc.DEVICE] <= 250_000


def test_a_request_is_frozen_and_checks_itself() -> None:
    request = _request()
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.device_budget = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="forward_group=0 must be a positive int or None"):
        _request(forward_group=0)
    with pytest.raises(TypeError, match="takes a PlanRequest, or the fields of one, not both"):
        plan(request, nvme=True)
    # a variant of a request is a replaced copy; the original is unchanged
    fixed = dataclasses.replace(request, fixed=(((0, 3), (3, 6)), Placement.uniform(2, Loc.HOST)),
                                device_budget=None)
    assert plan(fixed).bounds == ((0, 3), (3, 6)) and request.fixed is None


def test_a_plan_serializes_itself_exactly() -> None:
    """Plan.to_json and Plan.from_json carry every field through JSON text (chunks, tied
    gradients held, forward groups, overlapped updates), in the format the report writes."""
    plans = [plan(_request(nvme=True, update_chunk=30_000, host_budget=400_000,
                           fixed=(((0, 2), (2, 4), (4, 6)), Placement.uniform(3, Loc.NVME)))),
             plan(_request(tied=[((0, 5), 40_000)], device_budget=None,
                           fixed=(((0, 3), (3, 6)), Placement.uniform(2, Loc.HOST)))),
             plan(_request(forward_group=2, device_budget=None)),
             plan(_request(overlap_updates=True, device_budget=200_000))]
    assert plans[0].sizes.chunks and plans[1].sizes.held and plans[2].forward_group == 2
    assert plans[3].overlap_updates
    for p in plans:
        data = json.loads(json.dumps(p.to_json()))
        assert Plan.from_json(data) == p
        assert plan_to_json(p) == p.to_json()


def test_planning_parallel_training_and_tools_import_along_the_layers() -> None:
    """The pipeline takes a PlanRequest instead of reading a trainer's private state, the
    trainer reads plan files through Plan instead of the report: no module of
    ``harmony.planning``, ``harmony.parallel``, ``harmony.training`` or ``harmony.tools``
    imports a later layer, and none of them import each other in a cycle."""
    mine = ("harmony.planning", "harmony.parallel", "harmony.training", "harmony.tools")
    graph = {m: {d for d in deps if d.startswith(mine)} for m, deps in _graph().items()
             if m.startswith(mine)}
    against = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
               if _layer(d) > _layer(m)]
    assert not against, against
    done: set[str] = set()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = [m for m in graph if m not in done and m in reach(m)]
    assert not cycles, f"in an import cycle: {cycles}"
    assert LAYERS.index("harmony.parallel") < LAYERS.index("harmony.training")


# The size a module of these packages stays within ("no module over about 500 lines").
MAX_LINES = 520


def test_the_modules_that_plan_train_and_report_stay_small() -> None:
    long = {str(p.relative_to(ROOT)): n for top in ("planning", "training", "tools")
            for p in sorted((ROOT / "harmony" / top).glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by what each part holds: {long}"
