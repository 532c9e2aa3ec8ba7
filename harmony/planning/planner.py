"""Choosing packs and placement from budgets (greedy; the cost-model planner refines this).

Candidates are tried from the cheapest placement in traffic to the most frugal in device
memory: everything on the device; some packs wholly on the device and the others' weights and
optimizer state on the host; all of them on the host with activations on the device; then
activations on the host too; with an NVMe tier, the same again with NVMe in place of the host
(first keeping the packs that fit on the host). For each, pack counts from few to many and
prefetch depths 1 and 0 are lowered and simulated; among the candidates of the first placement
that fits both budgets, the one with the lowest predicted step time wins, unless a later
placement of the same tier near its pack count is clearly (5%) faster. :func:`refine` then
moves values of single packs one tier closer to the device (activations, or weights with their
optimizer state, of the last packs first) as far as the budgets allow, keeping each move that
makes the step faster or moves fewer bytes at the same speed.

Forward groups (``forward_group``, :mod:`harmony.planning.groups`): a given group size is planned
like any other setting. Asked to choose (``forward_group=None``), the planner takes the plan it
would take with a forward per micro-batch and tries, on that placement's fastest few
candidates only, forward groups of 2, 4, ... up to every micro-batch; one wins only if it fits
the budgets and is predicted faster. Grouping only adds device memory (a larger forward's
working bytes and its concatenated input), so no placement that did not fit without groups
fits with them.

What is asked is one value, a :class:`~harmony.planning.request.PlanRequest`; the candidates
come from :mod:`harmony.planning.candidates` and are priced by :mod:`harmony.planning.costs`;
the answer is a :class:`~harmony.planning.plan.Plan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from harmony.planning.candidates import (
    Candidate,
    bound_options,
    greedy_bounds,
    may_fit,
    placement_families,
    slowest,
)
from harmony.planning.costs import NVME_BANDWIDTH, chunk_options, chunked, pack_sizes, pack_times
from harmony.planning.groups import group_sizes, grouped_packs, ungrouped
from harmony.planning.microbatch import micro_batch_sizes
from harmony.planning.plan import InfeasiblePlan, Plan
from harmony.planning.profile import LayerProfile, scaled
from harmony.planning.request import Bounds, PlanRequest, Tied
from schedules.data_parallel import (
    ALLREDUCE_LINK,
    add_allreduce,
    add_reduce_broadcast,
    lag_updates,
    owners,
    shared_bandwidth,
)
from schedules.generators import generate
from schedules.lower import lower
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.simulate import SimResult, Sizes, Times, simulate
from schedules.task import Loc
from swap.tier import fmt_bytes

__all__ = ["ALLREDUCE_BANDWIDTH", "CLEARLY_FASTER", "GROUP_CANDIDATES", "NVME_BANDWIDTH",
           "InfeasiblePlan", "Plan", "PlanRequest", "Tied", "greedy_bounds",
           "largest_micro_batch", "pack_sizes", "pack_times", "plan", "refine"]

# A plan with more traffic replaces one with less only when predicted this much faster: the
# predictions are good to about 10% (BENCHMARKS.md), and bytes moved cost more than time alone
# (shared links, SSD wear).
CLEARLY_FASTER = 0.05
# Assumed all-reduce bytes/s per rank until measured (the trainer measures it).
ALLREDUCE_BANDWIDTH = 5.0e9
# How many of the fastest candidates the planner tries forward groups on, when it chooses.
GROUP_CANDIDATES = 6


def plan(request: PlanRequest | list[LayerProfile], *args: Any, **fields: Any) -> Plan:
    """The fastest predicted plan that fits the request's budgets.

    Args:
        request: what is asked for (:class:`~harmony.planning.request.PlanRequest`, whose
            fields say what each setting means). ``plan(profiles, schedule, ...)`` is
            ``plan(PlanRequest(profiles, schedule, ...))``.

    Raises:
        InfeasiblePlan: nothing fits; the message gives the numbers and what to change.
        ValueError: a forward group that is not a positive int, or one with another schedule.
        TypeError: a request given together with fields.

    Example::

        chosen = plan(PlanRequest(profiles, "harmony", [4] * 8, 8 << 30, None, 2.0,
                                  {"host->device": 12e9, "device->host": 12e9}))
    """
    if not isinstance(request, PlanRequest):
        request = PlanRequest(request, *args, **fields)
    elif args or fields:
        raise TypeError("plan() takes a PlanRequest, or the fields of one, not both")
    # Tried in order until one fits: with overlap_updates, every chunking on the worker
    # (an update there holds its host bytes while the next pack runs), then in line; with
    # update_chunk="auto", whole packs before chunks (see :class:`_Search`).
    update_chunk = request.update_chunk
    chunks = [None, "smaller"] if update_chunk == "auto" and request.nvme else [
        None if update_chunk == "auto" else update_chunk]
    failed: InfeasiblePlan | None = None
    for overlap in ([True, False] if request.overlap_updates else [False]):
        for chunk in chunks:
            try:
                found = _Search(dataclasses.replace(request, update_chunk=chunk,
                                                    overlap_updates=overlap)).run()
            except InfeasiblePlan as e:
                failed = e
                continue
            return dataclasses.replace(found, overlap_updates=overlap)
    assert failed is not None
    raise failed


# A candidate left unsimulated because its homes alone break a budget, kept to be simulated
# only if nothing fits: its index among the tried, its settings, its sizes and times.
_Skipped = tuple[int, Bounds, Placement, int, Sizes, Times, tuple[int, ...] | None, int | None]


class _Search:
    """:func:`plan` for one choice of ``update_chunk`` (None, bytes, or ``"smaller"``: per
    candidate, the largest of :func:`~harmony.planning.costs.chunk_options` that fits) and of
    ``overlap_updates``, both as the request says.

    Example::

        found = _Search(request).run()   # the fastest plan that fits, or InfeasiblePlan
    """

    def __init__(self, request: PlanRequest) -> None:
        self.request = request
        self.micro_batch_count = len(request.micro_batches)
        self.group = request.forward_group or 1
        self.bandwidth = shared_bandwidth({**NVME_BANDWIDTH, ALLREDUCE_LINK: ALLREDUCE_BANDWIDTH,
                                           **request.bandwidth}, request.local_ranks)
        self.bound_options, fixed_placement = bound_options(request)
        self.options: list[list[Candidate]] = (
            [[(b, fixed_placement) for b in self.bound_options]] if fixed_placement is not None
            else placement_families(request, self.bound_options))
        self.prefetches = [request.prefetch] if request.prefetch is not None else [1, 0]

    # -- budgets ---------------------------------------------------------------------------
    def excess(self, r: SimResult) -> tuple[float, float]:
        """How far over budget the device and then the host are (1.0: within budget). The
        most frugal plan minimises device excess first, so ``host_needed`` of the error is
        what the host needs once the device fits."""
        return (_ratio(r.peak.get(Loc.DEVICE, 0), self.request.device_budget),
                _ratio(r.peak.get(Loc.HOST, 0), self.request.host_budget))

    def fits(self, r: SimResult) -> bool:
        return self.excess(r) == (1.0, 1.0)

    # -- one candidate ---------------------------------------------------------------------
    def sizes(self, bounds: Bounds) -> tuple[Sizes, tuple[int, ...] | None]:
        """The bytes of a step over ``bounds`` (K only for this rank's packs when sharded),
        and every pack's owner."""
        r = self.request
        return _sharded(pack_sizes(r.profiles, bounds, r.micro_batches, r.k_ratio, r.tied),
                        r.ranks, r.shard)

    def times(self, bounds: Bounds, group: int) -> Times:
        r = self.request
        return pack_times(r.profiles, bounds, r.micro_batches, r.upd_s_per_byte, self.bandwidth,
                          group)

    def lowered_plan(self, bounds: Bounds, placement: Placement, pf: int, sizes: Sizes,
                     times: Times, own: tuple[int, ...] | None, g: int,
                     chunks: Sequence[int | None] = (None,)) -> Plan:
        """The plan of these settings, with the first of ``chunks`` (most generous first)
        whose chunked updates fit (else the last)."""
        r = self.request
        packs = grouped_packs(r.profiles, bounds) if g > 1 else frozenset()
        lowered = _lowered(r.schedule, len(bounds), self.micro_batch_count, r.deferred_updates,
                           placement, pf, r.ranks, own is not None, g, packs)
        for chunk in chunks:
            sized = chunked(sizes, r.profiles, bounds, r.k_ratio, chunk)
            result = simulate(lowered, sized, times, r.ranks, _owned(own, r.shard), r.staging,
                              r.overlap_updates)
            if self.fits(result):
                break
        return Plan(bounds, lowered, sized, result, own, g,
                    ungrouped(r.profiles, bounds) if g > 1 else (), chunk)

    def fitting_at(self, bounds: Bounds, pf: int, g: int, chunk: int | None,
                   ) -> Callable[[Placement], Plan | None]:
        """Plans with these bounds, prefetch depth, forward groups and update chunks: the one
        of a placement, if it fits."""
        sizes, own = self.sizes(bounds)
        return partial(self._if_fits, bounds, pf, sizes, self.times(bounds, g), own, g, chunk)

    def _if_fits(self, bounds: Bounds, pf: int, sizes: Sizes, times: Times,
                 own: tuple[int, ...] | None, g: int, chunk: int | None,
                 placement: Placement) -> Plan | None:
        candidate = self.lowered_plan(bounds, placement, pf, sizes, times, own, g, (chunk,))
        return candidate if self.fits(candidate.predicted) else None

    # -- the search ------------------------------------------------------------------------
    def run(self) -> Plan:
        """The fastest plan of the first placement family that fits (or a clearly faster one
        of the same tier), refined; else InfeasiblePlan for the most frugal candidate."""
        r = self.request
        tried: list[tuple[SimResult, Plan] | None] = []  # every candidate, in order
        skipped: list[_Skipped] = []
        chosen: Plan | None = None
        for candidates in self.options:
            if chosen is not None:
                # The first placement family that fits (the least traffic) decides the tier,
                # but a later family of the same tier may be clearly faster (keeping a pack
                # resident can cost more in activations than it saves in weights): try those
                # near the chosen pack count, and take one only if it beats the prediction's
                # error.
                if not candidates or slowest(candidates[0][1]) is not slowest(chosen.placement):
                    continue
                at = self.bound_options.index(chosen.bounds)
                near = self.bound_options[max(0, at - 1):at + 2]
                candidates = [(b, placement) for b, placement in candidates if b in near]
            best, fitting = self._family(candidates, tried, skipped)
            if best is not None and r.forward_group is None and r.schedule == "harmony":
                best = self._grouped(fitting, best)
            if best is not None and (chosen is None or (best.predicted.step_time or 0.0)
                                     < (chosen.predicted.step_time or 0.0)
                                     * (1 - CLEARLY_FASTER)):
                chosen = best
        if chosen is not None:
            if r.fixed is not None or r.schedule == "resident":
                return chosen
            assert chosen.schedule.prefetch is not None
            return refine(chosen, self.fitting_at(chosen.bounds, chosen.schedule.prefetch,
                                                  chosen.forward_group, chosen.update_chunk))
        raise self._infeasible(tried, skipped)

    def _family(self, candidates: list[Candidate], tried: list[tuple[SimResult, Plan] | None],
                skipped: list[_Skipped]) -> tuple[Plan | None, list[Plan]]:
        """Lower and simulate every candidate of one placement family at each prefetch depth
        (appending to ``tried``, or to ``skipped`` those that cannot fit); returns the fastest
        that fits (None if none does) and all that fit."""
        r = self.request
        best: Plan | None = None
        fitting: list[Plan] = []
        for bounds, placement in candidates:
            sizes, own = self.sizes(bounds)
            times = self.times(bounds, self.group)
            fits_homes = may_fit(sizes, placement, r.device_budget, r.host_budget)
            chunks = chunk_options(r.update_chunk, r.profiles, bounds, placement, sizes,
                                   r.k_ratio)
            for pf in self.prefetches:
                if tried and pf == 0 and len(self.prefetches) > 1 and tried[-1] is not None \
                        and self.fits(tried[-1][0]):
                    continue  # prefetching fits: not prefetching only waits longer
                if not fits_homes:
                    # The simulator charges every W and K at its home before the first task,
                    # so this candidate cannot fit: lower and simulate it only if nothing fits.
                    skipped.append((len(tried), bounds, placement, pf, sizes, times, own,
                                    chunks[-1]))
                    tried.append(None)
                    continue
                candidate = self.lowered_plan(bounds, placement, pf, sizes, times, own,
                                              self.group, chunks)
                result = candidate.predicted
                tried.append((result, candidate))
                if self.fits(result):
                    assert result.step_time is not None
                    fitting.append(candidate)
                    if best is None or result.step_time < (best.predicted.step_time or 0.0):
                        best = candidate
        return best, fitting

    def _grouped(self, fitting: list[Plan], best: Plan) -> Plan:
        """Forward groups on the fastest few candidates (grouping adds device memory only, so
        the placement stays the first that fits): the fastest that fits, or ``best``."""
        profiles = self.request.profiles
        fitting = sorted(fitting, key=lambda c: c.predicted.step_time or 0.0)
        for c in fitting[:GROUP_CANDIDATES]:
            if not grouped_packs(profiles, c.bounds):
                continue
            assert c.schedule.placement is not None and c.schedule.prefetch is not None
            previous = c.predicted.step_time or 0.0
            whole, own_c = self.sizes(c.bounds)
            for g in group_sizes(self.micro_batch_count):
                grouped = self.lowered_plan(c.bounds, c.schedule.placement, c.schedule.prefetch,
                                            whole, self.times(c.bounds, g), own_c, g,
                                            (c.update_chunk,))
                step = grouped.predicted.step_time or 0.0
                if not self.fits(grouped.predicted) or step >= previous:
                    break  # larger groups need more memory still, and gain less
                previous = step
                if step < (best.predicted.step_time or 0.0):
                    best = grouped
        return best

    def _infeasible(self, tried: list[tuple[SimResult, Plan] | None],
                    skipped: list[_Skipped]) -> InfeasiblePlan:
        """The error for the most frugal candidate (the skipped ones simulated now)."""
        r = self.request
        for i, bounds, placement, pf, sizes, times, own, chunk in skipped:
            candidate = self.lowered_plan(bounds, placement, pf, sizes, times, own, self.group,
                                          (chunk,))
            tried[i] = (candidate.predicted, candidate)
        tightest: tuple[SimResult, Plan] | None = None
        for entry in tried:  # the same choice, in the same order, as without the shortcut
            assert entry is not None
            if tightest is None or self.excess(entry[0]) < self.excess(tightest[0]):
                tightest = entry
        assert tightest is not None
        peak = tightest[0].peak
        return InfeasiblePlan(_infeasible(tightest[1], r.profiles, r.micro_batches,
                                          r.device_budget, r.host_budget, r.nvme),
                              peak.get(Loc.DEVICE, 0), peak.get(Loc.HOST, 0))


def _ratio(peak: int, budget: int | None) -> float:
    """``peak`` over ``budget`` when beyond it, else 1.0."""
    if budget is None or peak <= budget:
        return 1.0
    return peak / budget if budget > 0 else 1.0 + peak  # (a zero budget: order by peak)


_CLOSER = {Loc.NVME: Loc.HOST, Loc.HOST: Loc.DEVICE}


def refine(best: Plan, fitting: Callable[[Placement], Plan | None]) -> Plan:
    """Per-pack moves that the candidate families do not make, kept when they are faster.

    The families place every pack alike, or split the packs once (resident ones, or packs on
    the host before NVMe). From the best of them, this moves one kind of value one tier closer
    to the device (activations NVMe -> host -> device; weights with their optimizer state
    NVMe -> host, then host -> device) for as many packs as still fit, the last packs first
    (their updates and backward come first), finding that number by bisection over
    ``fitting`` (the lowered and simulated plan if it keeps every budget, else None). A move
    is kept only if the predicted step time falls, or stays within 0.1% while fewer bytes
    move; the result never breaks a budget. It costs about ``4 * log2(packs)`` simulations.
    """
    for kind, frm in (("x", Loc.NVME), ("wk", Loc.NVME), ("x", Loc.HOST), ("wk", Loc.HOST)):
        now = best.placement
        order = [p for p in reversed(range(now.packs))
                 if (now.x if kind == "x" else now.w)[p] is frm]
        lo, hi, start = 0, len(order), best  # bisect for the largest count that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            candidate = fitting(_closer(now, kind, frm, order[:mid]))
            if candidate is None:
                hi = mid - 1
                continue
            lo = mid
            if _better(candidate.predicted, best.predicted, start.predicted):
                best = candidate
    return best


def _closer(placement: Placement, kind: str, frm: Loc, packs: list[int]) -> Placement:
    """``placement`` with ``kind`` (``"x"``, or ``"wk"``: weights with their optimizer state)
    of ``packs`` moved from ``frm`` one tier closer to the device."""
    w, x = list(placement.w), list(placement.x)
    for p in packs:
        if kind == "x":
            x[p] = _CLOSER[frm]
        else:
            w[p] = _CLOSER[frm]
    return Placement(tuple(w), tuple(w), tuple(x))


def _better(a: SimResult, b: SimResult, start: SimResult) -> bool:
    """Whether ``a`` beats ``b``: a faster step, or one that moves fewer bytes (less traffic on
    shared links, less wear on the SSD) within 0.1% of the step time of ``start``, the plan
    the moves began from (so that small slowdowns cannot add up)."""
    ta, tb, t0 = a.step_time or 0.0, b.step_time or 0.0, start.step_time or 0.0
    fewer = sum(a.bytes_moved.values()) < sum(b.bytes_moved.values())
    return ta < tb * (1 - 1e-3) or (fewer and ta <= min(tb, t0) * (1 + 1e-3))


def _lowered(schedule: str, packs: int, micro_batches: int, deferred_updates: bool,
             placement: Placement, prefetch: int, ranks: int,
             sharded: bool = False, group: int = 1,
             grouped: frozenset[int] = frozenset()) -> Schedule:
    """The lowered schedule one rank runs (with all-reduces when ``ranks`` > 1; with reduces
    to the owners and broadcasts from them when the optimizer is ``sharded``); forwards of
    the packs ``grouped`` in groups of ``group`` micro-batches."""
    compute = generate(schedule, packs, micro_batches, deferred_updates, group, grouped)
    if ranks == 1:
        return lower(compute, placement, prefetch)
    lowered = lower(lag_updates(compute), placement, prefetch)
    return add_reduce_broadcast(lowered) if sharded else add_allreduce(lowered)


def _owned(own: tuple[int, ...] | None, shard: int | None) -> frozenset[int] | None:
    """The packs rank ``shard`` updates (None: every pack)."""
    if own is None:
        return None
    return frozenset(p for p, r in enumerate(own) if r == shard)


def _sharded(sizes: Sizes, ranks: int, shard: int | None) -> tuple[Sizes, tuple[int, ...] | None]:
    """``sizes`` with K only for the packs rank ``shard`` owns, and every pack's owner (the
    sizes unchanged and None without sharding)."""
    if shard is None or ranks == 1:
        return sizes, None
    own = owners(list(sizes.k), ranks)
    k = [n if own[p] == shard else 0 for p, n in enumerate(sizes.k)]
    return dataclasses.replace(sizes, k=k), own


def largest_micro_batch(batch: int, plan_for: Callable[[list[int]], Plan]) -> tuple[int, Plan]:
    """The largest micro-batch size whose split of ``batch`` samples ``plan_for`` can plan:
    the batch itself, then powers of two below it, largest first (fewer, larger micro-batches
    keep the device busier and, in the per-micro-batch schedule, move weights fewer times).

    Raises:
        InfeasiblePlan: not even micro-batches of one sample fit (the error of that size).

    >>> largest_micro_batch(6, lambda sizes: sizes)[0]   # anything that plans: the batch
    6
    """
    last: InfeasiblePlan | None = None
    for u in sorted({batch} | {1 << i for i in range(batch.bit_length()) if 1 << i < batch},
                    reverse=True):
        try:
            return u, plan_for(micro_batch_sizes(batch, u))
        except InfeasiblePlan as err:
            last = err
    assert last is not None
    raise last


def _infeasible(smallest: Plan, profiles: list[LayerProfile], micro_batches: list[int],
                device_budget: int | None, host_budget: int | None, nvme: bool) -> str:
    peak = smallest.predicted.peak
    dev, host = peak.get(Loc.DEVICE, 0), peak.get(Loc.HOST, 0)
    mbs = max(micro_batches)
    worst = max(range(len(profiles)), key=lambda i: profiles[i].w_bytes + profiles[i].g_bytes
                + scaled(profiles[i].saved_bytes + 2 * profiles[i].out_bytes, mbs))
    lp = profiles[worst]
    need = lp.w_bytes + lp.g_bytes + scaled(lp.saved_bytes + 2 * lp.out_bytes, mbs)
    parts = []
    if device_budget is not None and dev > device_budget:
        parts.append(
            f"device_memory={fmt_bytes(device_budget)} is too small at micro_batch_size={mbs}: "
            f"the most frugal plan ({len(smallest.bounds)} packs, everything off the device "
            f"between uses) needs {fmt_bytes(dev)} on the device; layer {worst} "
            f"({lp.name!r}) alone needs {fmt_bytes(need)} (weights {fmt_bytes(lp.w_bytes)}, "
            f"gradients {fmt_bytes(lp.g_bytes)}, activations "
            f"{fmt_bytes(need - lp.w_bytes - lp.g_bytes)}). Use device_memory>={fmt_bytes(dev)} "
            "or a smaller micro_batch_size"
            + (f" (or forward groups of fewer than {smallest.forward_group} micro-batches: a "
               "forward group holds the working memory of all its micro-batches at once)"
               if smallest.forward_group > 1 else ""))
    if host_budget is not None and host > host_budget:
        if nvme:
            chunk = smallest.update_chunk
            whole = all(len(smallest.sizes.chunks_of(p)) == 1 for p in range(len(smallest.bounds)))
            held = "its pack's master weights and optimizer state" if chunk is None or whole else (
                f"three chunks of at most {fmt_bytes(chunk)} of its pack's master weights "
                "and optimizer state")
            parts.append(
                f"host_memory={fmt_bytes(host_budget)} is too small: even with everything on "
                f"NVMe the plan needs {fmt_bytes(host)} on the host (an update holds {held} "
                "and the pack's gradients in host memory); use "
                f"host_memory>={fmt_bytes(host)}")
        else:
            parts.append(
                f"host_memory={fmt_bytes(host_budget)} is too small: the plan needs "
                f"{fmt_bytes(host)} on the host (weights, optimizer state, stashed "
                "activations); raise host_memory or give an nvme_dir")
    return "; ".join(parts) or "no plan fits the budgets"
