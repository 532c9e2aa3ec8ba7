"""What a plan for a model will hold, move and take, before anything runs (``harmony report``).

A report takes a model's per-layer profile (estimated on the meta device, measured, or one of
the Harmony paper's GPU profiles), asks the planner for the fastest plan within the budgets and
sets it beside two references:

* the per-micro-batch baseline: the same packs, placement and prefetch depth run micro-batch
  major (``per-microbatch``), so every micro-batch walks every pack and weights cross the link
  once per micro-batch;
* the traffic arithmetic (``docs/design.md``) for the chosen placement: every pack whose weights
  live off the device brings them in twice per step (forward, and backward after the recompute;
  once for the last pack, whose forward runs inside its backward), its gradients go out once to
  where the update runs, optimizer state on NVMe is read and written once, and each stashed
  activation off the device goes out and comes back once per micro-batch. The step time is
  bounded below by max(compute, bytes on each link / its bandwidth).

The plan's JSON form is the plan's own (:meth:`harmony.planning.plan.Plan.to_json`);
:func:`plan_to_json` and :func:`plan_from_json` call it. Profiles come from
:mod:`harmony.tools.profiles`.

>>> from harmony.tools.paper_profiles import load
>>> r = make_report(load("gpt2_medium", 4), batch_size=32, device_memory=10 << 30,
...                 host_memory=64 << 30)
>>> r.plan.predicted.peak[Loc.DEVICE] <= 10 << 30
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmony.planning.meta import ModelProfile
from harmony.planning.microbatch import micro_batch_sizes
from harmony.planning.plan import Plan, sim_to_json
from harmony.planning.planner import NVME_BANDWIDTH, pack_times, plan
from harmony.planning.profile import scaled
from harmony.tools.profiles import load_profile, load_spec, measure_profile
from schedules.generators import generate
from schedules.lower import lower
from schedules.placement import Placement
from schedules.simulate import SimResult, Sizes, link, simulate
from schedules.task import Kind, Loc, Op
from swap.tier import fmt_bytes

__all__ = ["DEFAULT_BANDWIDTH", "LINKS", "MAX_MICRO_BATCHES", "PlotUnavailable", "Report",
           "check_micro_batches", "format_report", "layer_rows", "load_profile", "load_spec",
           "make_report", "measure_profile", "micro_batch_sizes", "plan_from_json",
           "plan_to_json", "plot_report", "report_to_json", "traffic_arithmetic"]

GiB = 1 << 30
# PCIe 3.0 x16 as the Harmony paper measured it, per direction.
DEFAULT_BANDWIDTH = {"host->device": 11.5 * GiB, "device->host": 11.5 * GiB}
LINKS = ("host->device", "device->host", "nvme->device", "device->nvme", "nvme->host",
         "host->nvme")
_TIERS = (Loc.DEVICE, Loc.HOST, Loc.NVME)
# The most micro-batches per step a report plans: the planner lowers and simulates each
# candidate plan task by task, so its time and memory grow with the micro-batch count
# (`harmony report gpt2-xl --batch-size 1000 --device-memory 16GiB --host-memory 64GiB`: 196 s
# and 2.6 GB on the 2-core build machine). A count far above it is nearly always tokens given
# as --batch-size.
MAX_MICRO_BATCHES = 1024


# -- the report --------------------------------------------------------------------------------

@dataclass
class Report:
    """A plan for a profile within budgets, beside the per-micro-batch baseline and the bound.

    Attributes:
        plan: the chosen plan. baseline: the same packs, placement and prefetch depth run as
            ``per-microbatch``, simulated. arithmetic: the traffic arithmetic's bytes per
            link for the chosen placement. compute_s: seconds of compute per step (fwd, bwd,
            updates).
    """

    profile: ModelProfile
    batch_size: int
    micro_batches: list[int]
    device_memory: int | None
    host_memory: int | None
    nvme: bool
    schedule: str
    bandwidth: dict[str, float]
    plan: Plan
    baseline: SimResult
    arithmetic: dict[str, int]
    compute_s: float

    @property
    def step_bound(self) -> float:
        """max(compute, arithmetic bytes / bandwidth on every link), seconds."""
        links = [n / self.bandwidth[name] for name, n in self.arithmetic.items() if n]
        return max([self.compute_s, *links])


def check_micro_batches(batch_size: int, micro_batch_size: int) -> None:
    """Refuse a step of more than :data:`MAX_MICRO_BATCHES` micro-batches, before any work.

    Raises:
        ValueError: naming the count, the limit and the fixes.

    >>> check_micro_batches(64, 4)
    """
    n = -(-batch_size // micro_batch_size)
    if n > MAX_MICRO_BATCHES:
        raise ValueError(
            f"--batch-size {batch_size} in micro-batches of {micro_batch_size} makes {n} "
            f"micro-batches per step, and a report plans at most {MAX_MICRO_BATCHES} (planning "
            "time and memory grow with their number). --batch-size counts samples (sequences), "
            "not tokens: give the number of sequences per step, or raise --micro-batch-size to "
            f"at least {-(-batch_size // MAX_MICRO_BATCHES)}")


def make_report(profile: ModelProfile, batch_size: int, device_memory: int | None,
                host_memory: int | None, nvme: bool = False, schedule: str = "harmony",
                bandwidth: dict[str, float] | None = None,
                prefetch: int | None = None, forward_group: int | None = 1,
                update_chunk: int | str | None = "auto",
                overlap_updates: bool = False) -> Report:
    """Plan ``profile`` for ``batch_size`` samples within the budgets and compare.

    Args:
        profile: from :func:`load_profile`; its micro-batch size splits the batch.
        device_memory, host_memory: bytes, None for no limit. nvme: allow NVMe placements.
        schedule: the generator to plan (``harmony``, ``per-microbatch``, ``resident``).
        bandwidth: bytes/s per link (default :data:`DEFAULT_BANDWIDTH`; NVMe links default to
            :data:`harmony.planning.planner.NVME_BANDWIDTH`).
        prefetch: force a prefetch depth (None: the planner chooses).
        forward_group: micro-batches per forward in the packs whose layers may group (None:
            the planner chooses; see :func:`harmony.planning.planner.plan`).
        update_chunk: how NVMe-homed packs stream their updates (``"auto"``, bytes, or None
            for whole packs; see :func:`harmony.planning.planner.plan`).
        overlap_updates: plan host- and NVMe-homed packs' updates behind the next pack's
            backward (in line where only that fits).

    Raises:
        harmony.InfeasiblePlan: nothing fits; the message says what to change.
        ValueError: more than :data:`MAX_MICRO_BATCHES` micro-batches.
    """
    check_micro_batches(batch_size, profile.micro_batch_size)
    mbs = micro_batch_sizes(batch_size, profile.micro_batch_size)
    bw = {**NVME_BANDWIDTH, **DEFAULT_BANDWIDTH, **(bandwidth or {})}
    chosen = plan(profile.layers, schedule, mbs, device_memory, host_memory, profile.k_total,
                  bw, upd_s_per_byte=profile.upd_s_per_byte, prefetch=prefetch, nvme=nvme,
                  forward_group=forward_group, update_chunk=update_chunk,
                  overlap_updates=overlap_updates)
    times = pack_times(profile.layers, chosen.bounds, mbs, profile.upd_s_per_byte, bw,
                       chosen.forward_group)
    P, M = len(chosen.bounds), len(mbs)
    base_sched = lower(generate("per-microbatch", P, M), chosen.placement,
                       chosen.schedule.prefetch or 0)
    baseline = simulate(base_sched, chosen.sizes, times)
    fwd = [sum(times.forward(p, t.mbs) for t in chosen.schedule.tasks
               if t.op is Op.FWD and t.pack == p) for p in range(P)]
    compute = sum(sum(times.bwd[p]) + times.upd[p] + (fwd[p] if p < P - 1 else 0.0)
                  for p in range(P))
    if chosen.overlap_updates:  # host- (and untied NVMe-) homed packs' updates run beside
        behind = sum(times.upd[p] for p in range(P) if chosen.placement.k[p] is Loc.HOST
                     or (chosen.placement.k[p] is Loc.NVME and not chosen.sizes.held))
        compute = max(compute - behind, behind)
    return Report(profile, batch_size, mbs, device_memory, host_memory, nvme, schedule, bw,
                  chosen, baseline, traffic_arithmetic(chosen.sizes, chosen.placement), compute)


def traffic_arithmetic(sizes: Sizes, placement: Placement) -> dict[str, int]:
    """The traffic arithmetic's bytes per link and step for this placement (see the module
    docstring)."""
    out = dict.fromkeys(LINKS, 0)
    P = placement.packs
    for p in range(P):
        if placement.w[p] is not Loc.DEVICE:
            out[link(placement.w[p], Loc.DEVICE)] += (1 if p == P - 1 else 2) * sizes.w[p]
        upd = placement.update_loc(p)
        if upd is not Loc.DEVICE:
            out[link(Loc.DEVICE, upd)] += sizes.g[p]
        if placement.k[p] is Loc.NVME:  # master weights and state through host memory
            streamed = sum(w + k for w, k in sizes.chunks_of(p))  # (not frozen weights)
            out["nvme->host"] += streamed
            out["host->nvme"] += streamed
        home = placement.home(Kind.X, p)
        for x in sizes.x[p]:
            if p == 0:
                out[link(home, Loc.DEVICE)] += x  # the input batch arrives once
            elif home is not Loc.DEVICE:
                out[link(Loc.DEVICE, home)] += x
                out[link(home, Loc.DEVICE)] += x
    return out


# -- text ------------------------------------------------------------------------------------

def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f}ms"
    if s >= 1e-6:
        return f"{s * 1e6:.2f}us"
    return f"{s * 1e9:.2f}ns"


def _table(rows: list[list[str] | str], right: set[int]) -> list[str]:
    """Aligned columns; a plain string is a line of its own that sets no width."""
    cells = [r for r in rows if isinstance(r, list)]
    widths = [max(len(r[c]) for r in cells) for c in range(len(cells[0]))]
    return ["  " + ("  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                              for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
                    if isinstance(row, list) else row)
            for row in rows]


def layer_rows(profile: ModelProfile) -> list[list[str] | str]:
    """The per-layer table's rows (header first); runs of three or more identical layers show
    their first and last row around one summary row."""
    u, k = profile.micro_batch_size, profile.k_total  # K: fp32 masters too, if mixed
    header = ["#", "layer", "params", "W", "G", "K", "X in", "saved", "fwd", "bwd"]

    def row(i: int) -> list[str]:
        lp = profile.layers[i]
        return [str(i), lp.name, _count(profile.params[i]), fmt_bytes(lp.w_bytes),
                fmt_bytes(lp.g_bytes), fmt_bytes(scaled(k * lp.g_bytes, 1)),
                fmt_bytes(scaled(lp.in_bytes, u)), fmt_bytes(scaled(lp.saved_bytes, u)),
                _secs(lp.fwd_s * u), _secs(lp.bwd_s * u)]

    def same(i: int, j: int) -> bool:
        a, b = profile.layers[i], profile.layers[j]
        return profile.params[i] == profile.params[j] and \
            (a.w_bytes, a.g_bytes, a.in_bytes, a.saved_bytes, a.out_bytes, a.fwd_s, a.bwd_s) \
            == (b.w_bytes, b.g_bytes, b.in_bytes, b.saved_bytes, b.out_bytes, b.fwd_s, b.bwd_s)

    rows: list[list[str] | str] = [header]
    i, n = 0, len(profile.layers)
    while i < n:
        j = i
        while j + 1 < n and same(i, j + 1):
            j += 1
        if j - i >= 2:
            names = profile.layers
            rows += [row(i), f"   ... {names[i + 1].name}..{names[j - 1].name}: {j - i - 1} "
                              "more like the row above", row(j)]
        else:
            rows += [row(m) for m in range(i, j + 1)]
        i = j + 1
    total_k = scaled(k * sum(lp.g_bytes for lp in profile.layers), 1)
    rows.append(["", "total", _count(sum(profile.params)),
                 fmt_bytes(sum(lp.w_bytes for lp in profile.layers)),
                 fmt_bytes(sum(lp.g_bytes for lp in profile.layers)), fmt_bytes(total_k),
                 "", "", _secs(sum(lp.fwd_s for lp in profile.layers) * u),
                 _secs(sum(lp.bwd_s for lp in profile.layers) * u)])
    return rows


def format_report(r: Report) -> str:
    """The report as text: layers, plan, peaks, bytes per link, step time."""
    prof, pl = r.profile, r.plan
    u, M = prof.micro_batch_size, len(r.micro_batches)

    def budget(b: int | None) -> str:
        return "no limit" if b is None else fmt_bytes(b)

    seq = f", seq_len {prof.seq_len}" if prof.seq_len else ""
    used_links = [name for name in LINKS if r.arithmetic.get(name)
                  or pl.predicted.bytes_moved.get(name) or r.baseline.bytes_moved.get(name)]
    lines = [f"harmony report: {prof.name} ({prof.source})",
             f"batch {r.batch_size} = {M} micro-batches of <= {u} samples{seq}; "
             f"budgets: device {budget(r.device_memory)}, host {budget(r.host_memory)}, "
             f"nvme {'on' if r.nvme else 'off'}",
             "links: " + ", ".join(f"{name} {fmt_bytes(r.bandwidth[name])}/s"
                                   for name in (used_links or list(DEFAULT_BANDWIDTH))),
             "",
             f"layers (X in, saved: activation bytes per micro-batch of {u}; fwd, bwd: seconds "
             f"per micro-batch, bwd including the recompute; K = {prof.k_total:.2f} x G)"]
    lora = prof.extra.get("lora")
    if lora:
        lines.append(f"LoRA r={lora['r']} on {lora['adapted_linears']} linear layers: "
                     f"{_count(lora['trainable'])} trainable of {_count(sum(prof.params))} "
                     "parameters; frozen weights are W only (no G, no K)")
    if prof.precision != "fp32":
        lines.append(f"precision {prof.precision}: W and activations in {prof.precision} "
                     "(norm weights fp32), G fp32, K = fp32 master weights + optimizer state")
    lines += _table(layer_rows(prof), right={0, 2, 3, 4, 5, 6, 7, 8, 9})
    lines += ["", "plan", *("  " + line for line in pl.describe(prof.names).splitlines())]

    lines += ["", f"predicted peak per tier    {pl.schedule.name:>14}  {'per-microbatch':>14}  "
              "budget"]
    budgets = {Loc.DEVICE: r.device_memory, Loc.HOST: r.host_memory, Loc.NVME: None}
    for tier in _TIERS:
        a, b = pl.predicted.peak.get(tier, 0), r.baseline.peak.get(tier, 0)
        if not (a or b):
            continue
        cap = budgets[tier]
        over = "  (baseline over budget)" if cap is not None and b > cap else ""
        lines.append(f"  {tier.value:<24} {fmt_bytes(a):>14}  {fmt_bytes(b):>14}  "
                     f"{budget(cap) if tier is not Loc.NVME else '-'}{over}")

    lines += ["", f"bytes per step by link     {pl.schedule.name:>14}  {'per-microbatch':>14}  "
              f"{'arithmetic':>12}"]
    for name in used_links:
        a, b = pl.predicted.bytes_moved.get(name, 0), r.baseline.bytes_moved.get(name, 0)
        ratio = f"  (x{b / a:.1f})" if a else ""
        lines.append(f"  {name:<24} {fmt_bytes(a):>14}  {fmt_bytes(b):>14}  "
                     f"{fmt_bytes(r.arithmetic.get(name, 0)):>12}{ratio}")
    if not used_links:
        lines.append("  (nothing moves: every value stays on the device)")
    w_in = pl.predicted.bytes_by_kind
    total_w = sum(pl.sizes.w)
    h_w = sum(n for (lk, kind), n in w_in.items() if kind == "W" and lk.endswith("->device"))
    b_w = sum(n for (lk, kind), n in r.baseline.bytes_by_kind.items()
              if kind == "W" and lk.endswith("->device"))
    if h_w:
        lines.append(f"  weights onto the device: {h_w / total_w:.2f} x W per step "
                     f"({pl.schedule.name}), {b_w / total_w:.2f} x W (per-microbatch), "
                     f"M = {M}")

    link_bound = {name: n / r.bandwidth[name] for name, n in r.arithmetic.items() if n}
    worst = max(link_bound, key=lambda k: link_bound[k]) if link_bound else None
    bound_text = f"compute {_secs(r.compute_s)}" + (
        f", {worst} {_secs(link_bound[worst])}" if worst else "")
    lines += ["", f"predicted step time: {_secs(pl.predicted.step_time)} ({pl.schedule.name}), "
              f"{_secs(r.baseline.step_time)} (per-microbatch, same packs and placement); "
              f"bound max({bound_text}) = {_secs(r.step_bound)}"]
    return "\n".join(lines)


# -- JSON ------------------------------------------------------------------------------------

def plan_to_json(p: Plan) -> dict[str, Any]:
    """``p.to_json()`` (:meth:`harmony.planning.plan.Plan.to_json`): a plan as JSON-ready data."""
    return p.to_json()


def plan_from_json(data: dict[str, Any]) -> Plan:
    """``Plan.from_json(data)`` (:meth:`harmony.planning.plan.Plan.from_json`)."""
    return Plan.from_json(data)


def report_to_json(r: Report) -> dict[str, Any]:
    """Everything the report shows, plus the plan in :meth:`Plan.to_json` form and the profile,
    so a later run can load the plan (``Plan.from_json(data["plan"])``) and re-check it."""
    return {"format": "harmony-report/1",
            "model": r.profile.name,
            "layers": r.profile.names,
            "batch_size": r.batch_size, "micro_batches": r.micro_batches,
            "budgets": {"device": r.device_memory, "host": r.host_memory, "nvme": r.nvme},
            "bandwidth": r.bandwidth, "k_ratio": r.profile.k_ratio,
            "precision": r.profile.precision,
            "upd_s_per_byte": r.profile.upd_s_per_byte,
            "plan": r.plan.to_json(),
            "baseline": {"schedule": "per-microbatch", **sim_to_json(r.baseline)},
            "design_arithmetic": {"bytes": r.arithmetic, "compute_s": r.compute_s,
                                  "step_time_bound_s": r.step_bound},
            "profile": r.profile.to_json()}


# -- plot ------------------------------------------------------------------------------------

class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_report(r: Report, path: str | Path) -> None:
    """Draw bytes held per tier over the step to ``path``: one panel per tier in use, the
    chosen schedule beside the per-micro-batch baseline, the budget dashed.

    The x axis is the position in the step (task index / number of tasks, so schedules of
    different lengths line up); the y axis is the bytes held after each task (the working
    bytes of a running task are in the predicted peak but not in the curve).

    Raises:
        PlotUnavailable: matplotlib is missing (``pip install 'harmony[plot]'``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: pip install "
                              "matplotlib (or pip install 'harmony[plot]')") from None
    runs = ((r.plan.schedule.name, r.plan.predicted, "tab:red"),
            ("per-microbatch", r.baseline, "tab:gray"))
    tiers = [t for t in _TIERS if any(point.get(t, 0) for _, res, _ in runs
                                      for point in res.timeline)] or [Loc.DEVICE]
    budgets = {Loc.DEVICE: r.device_memory, Loc.HOST: r.host_memory}
    fig = Figure(figsize=(10, 2.6 * len(tiers) + 0.6), layout="constrained")
    axes = fig.subplots(len(tiers), 1, sharex=True, squeeze=False)[:, 0]
    for ax, tier in zip(axes, tiers):
        for name, res, color in runs:
            n = max(len(res.timeline), 1)
            ys = [point.get(tier, 0) / GiB for point in res.timeline]
            ax.step([i / n for i in range(len(ys))], ys, where="post", color=color,
                    label=f"{name} (step {_secs(res.step_time)})")
        cap = budgets.get(tier)
        if cap is not None:
            ax.axhline(cap / GiB, color="black", linestyle="--", linewidth=0.8,
                       label=f"budget {fmt_bytes(cap)}")
        ax.set_ylabel(f"{tier.value} GiB")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"{r.profile.name}: bytes held per tier over one step, batch "
                      f"{r.batch_size} in {len(r.micro_batches)} micro-batches", fontsize=10)
    axes[-1].set_xlabel("position in the step (fraction of its tasks)")
    fig.savefig(path)
