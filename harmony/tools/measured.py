"""A recorded step (``Trainer.record_step``) next to what its plan predicted.

``harmony report --run step.json`` prints, for one real step: peak bytes per tier, bytes per
link and the step time, each measured beside predicted; per phase, where the time went; and the
tasks that took longest, so a user sees where the plan and reality part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmony.planning.plan import Plan
from harmony.tools.report import PlotUnavailable
from schedules.task import Loc, Task
from swap.tier import fmt_bytes


@dataclass
class MeasuredStep:
    """One recorded step: the raw record and its plan (with the prediction)."""

    data: dict[str, Any]
    plan: Plan


def load_measured(path: str | Path) -> MeasuredStep:
    """Read a file ``Trainer.record_step`` wrote; ValueError naming it if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != "harmony-step/1":
            raise ValueError("no 'format': 'harmony-step/1'")
        return MeasuredStep(data, Plan.from_json(data["plan"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a step recorded by Trainer.record_step ({err})") from err


def _phase(text: str) -> str:
    op = Task.parse(text).op.name
    return {"FWD": "forward", "BWD": "backward", "UPD": "update"}.get(op, "data moves")


def format_measured(step: MeasuredStep) -> str:
    """The comparison as text tables."""
    d, pred = step.data, step.plan.predicted
    lines = [f"measured step {d['step']} (loss {d['loss']:.4f}) against its plan",
             step.plan.describe([f"layer {i}" for i in range(step.plan.bounds[-1][1])]), "",
             "| tier | measured peak | predicted peak | budget |", "|---|---|---|---|"]
    for loc in Loc:
        measured = d["peak_bytes"].get(loc.value)
        if measured is None:
            continue
        budget = d["budgets"].get(loc.value)
        lines.append(f"| {loc.value} | {fmt_bytes(measured)} | "
                     f"{fmt_bytes(pred.peak.get(loc, 0))} | "
                     f"{'-' if budget is None else fmt_bytes(budget)} |")
    lines += ["", "| link | measured bytes | predicted bytes | busy s | stall s |",
              "|---|---|---|---|---|"]
    for link in sorted(set(d["bytes_moved"]) | set(pred.bytes_moved)):
        lines.append(f"| {link} | {fmt_bytes(d['bytes_moved'].get(link, 0))} | "
                     f"{fmt_bytes(pred.bytes_moved.get(link, 0))} | "
                     f"{d['busy_seconds'].get(link, 0.0):.3f} | "
                     f"{d['stall_seconds'].get(link, 0.0):.3f} |")
    predicted = "-" if pred.step_time is None else f"{pred.step_time:.3f} s"
    lines += ["", f"step time: measured {d['seconds']:.3f} s, predicted {predicted}"]
    phases: dict[str, float] = {}
    for t in d["tasks"]:
        phases[_phase(t["task"])] = phases.get(_phase(t["task"]), 0.0) + t["end"] - t["start"]
    lines.append("time per phase: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    slowest = sorted(d["tasks"], key=lambda t: t["end"] - t["start"], reverse=True)[:5]
    lines.append("longest tasks: " + ", ".join(
        f"{t['task']} {t['end'] - t['start']:.3f} s" for t in slowest))
    return "\n".join(lines)


def plot_measured(step: MeasuredStep, path: str | Path) -> None:
    """Device bytes over the step, measured (per task, against time) and predicted.

    Raises:
        PlotUnavailable: matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: pip install "
                              "matplotlib (or pip install 'harmony[plot]')") from None
    tasks = step.data["tasks"]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    n = max(len(tasks), 1)
    ax.step([i / n for i in range(len(tasks))],
            [t["bytes"].get("device", 0) / 2**20 for t in tasks], where="post",
            color="tab:red", label=f"measured (step {step.data['seconds']:.3f} s)")
    timeline = step.plan.predicted.timeline
    m = max(len(timeline), 1)
    ax.step([i / m for i in range(len(timeline))],
            [p.get(Loc.DEVICE, 0) / 2**20 for p in timeline], where="post", color="tab:gray",
            label="predicted")
    budget = step.data["budgets"].get("device")
    if budget is not None:
        ax.axhline(budget / 2**20, color="black", linestyle="--", linewidth=0.8,
                   label=f"budget {fmt_bytes(budget)}")
    ax.set_xlabel("position in the step (fraction of its tasks)")
    ax.set_ylabel("device MiB")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path)
