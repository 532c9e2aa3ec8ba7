"""What ``Trainer.record_step`` writes: one step's tasks, bytes, times and peaks beside its
plan and prediction, as the JSON file ``harmony report --run`` reads
(:mod:`harmony.tools.measured`).

A :class:`Recorder` runs the step with the runtime recording each task, then writes the file;
the trainer asks it, when it builds a fresh runtime inside the recorded step, for the list to
record into (:attr:`Recorder.tasks`) and tells it how long planning took.

Example::

    recorder = Recorder()
    loss = recorder.record("step.json", lambda: trainer.step(x, y), trainer)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from harmony.planning.plan import Plan
    from harmony.runtime.runtime import Runtime
    from schedules.task import Loc
    from swap.stats import Stats
    from swap.tier import Tier

__all__ = ["Recorded", "Recorder", "counters", "step_record", "writable"]


class Recorded(Protocol):
    """What a recorded step is read from (a :class:`harmony.Trainer`)."""

    stats: Stats
    tiers: dict[Loc, Tier]
    step_count: int

    @property
    def runtime(self) -> Runtime | None: ...

    @property
    def plan(self) -> Plan | None: ...

    @property
    def device_memory(self) -> int | None: ...

    @property
    def host_memory(self) -> int | None: ...


class Recorder:
    """Records steps (see the module docstring).

    Attributes:
        tasks: while a step is recorded, the list its runtime records into (None otherwise).
        planning_seconds: the recorded step's profile, plan and build (0.0 unless it was the
            first step).
    """

    def __init__(self) -> None:
        self.tasks: list[dict[str, object]] | None = None
        self.planning_seconds = 0.0

    def record(self, path: str | os.PathLike[str], step: Callable[[], float],
               trainer: Recorded) -> float:
        """Run ``step`` with ``trainer``'s runtime recording its tasks, and write the record
        to ``path``; returns the step's loss.

        Raises:
            OSError: ``path`` cannot be written; checked before the step, which then does
                not run.
        """
        out = Path(path)
        tmp = writable(out)  # before the step: a path it cannot write refuses the step
        try:
            before = counters(trainer.stats)
            for tier in trainer.tiers.values():
                tier.reset_peak()
            tasks: list[dict[str, object]] = []
            first = trainer.runtime is None
            self.tasks = tasks  # (the step passes it to the runtime)
            self.planning_seconds = 0.0
            t0 = time.perf_counter()
            try:
                loss = step()
            finally:
                self.tasks = None
            seconds = time.perf_counter() - t0 - self.planning_seconds
            assert trainer.plan is not None
            data = step_record(trainer.step_count - 1, seconds, first, self.planning_seconds,
                               loss, tasks, before, trainer.stats, trainer.tiers,
                               (trainer.device_memory, trainer.host_memory), trainer.plan)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return loss

FORMAT = "harmony-step/1"

# (bytes moved, busy seconds, stall seconds) per link, as Stats counts them.
Counters = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]


def writable(path: Path) -> Path:
    """A new empty file next to ``path`` that will replace it (so ``path`` can be written).

    Raises:
        OSError: of the kind the file system gave, naming ``path`` and saying the step was
            not run.
    """
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(name)
    except OSError as err:
        raise type(err)(err.errno, f"record_step(path={str(path)!r}): cannot write there "
                                   f"({err.strerror}); give a writable file path. The step "
                                   "was not run") from err


def counters(stats: Stats) -> Counters:
    """The per-link counters of ``stats`` now (copies), to subtract from after a step."""
    return (dict(stats.bytes_moved), dict(stats.busy_seconds), dict(stats.stall_seconds))


def _delta(now: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0)}


def step_record(step: int, seconds: float, first: bool, planning_seconds: float, loss: float,
                tasks: list[dict[str, object]], before: Counters, stats: Stats,
                tiers: dict[Loc, Tier], budgets: tuple[int | None, int | None],
                plan: Plan) -> dict[str, Any]:
    """The JSON data of one recorded step (``before``: :func:`counters` before it; budgets:
    device and host)."""
    return {
        "format": FORMAT, "step": step, "seconds": seconds,
        "first": first, "planning_seconds": planning_seconds,
        "loss": loss, "tasks": tasks,
        "bytes_moved": _delta(stats.bytes_moved, before[0]),
        "busy_seconds": _delta(stats.busy_seconds, before[1]),
        "stall_seconds": _delta(stats.stall_seconds, before[2]),
        "peak_bytes": {loc.value: tier.peak for loc, tier in tiers.items()},
        "budgets": {"device": budgets[0], "host": budgets[1]},
        "plan": plan.to_json()}
