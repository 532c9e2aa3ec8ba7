"""The candidates the planner tries: pack boundaries and the placement families over them.

Boundaries: consecutive layers grouped greedily by weight bytes, for pack counts from one to
every layer (:func:`bound_options`). Placements, in the order the planner tries them, from the
least traffic to the least device memory (:func:`placement_families`): everything on the
device; some packs wholly on the device and the others' weights and optimizer state on the
host; all on the host with activations on the device; then activations on the host too; with
an NVMe tier the same again with NVMe in place of the host, first keeping the packs that fit on
the host.

>>> greedy_bounds([4, 4, 4, 4], 2)
((0, 2), (2, 4))
"""

from __future__ import annotations

import math

from harmony.planning.profile import LayerProfile
from harmony.planning.request import Bounds, PlanRequest
from schedules.placement import Placement
from schedules.simulate import Sizes
from schedules.task import Loc

__all__ = ["Candidate", "bound_options", "greedy_bounds", "may_fit", "placement_families",
           "slowest"]

Candidate = tuple[Bounds, Placement]


def greedy_bounds(weights: list[int], packs: int) -> Bounds:
    """Consecutive layers, each pack up to total/packs bytes (at least one layer per pack)."""
    cap = max(math.ceil(sum(weights) / packs), max(weights))
    bounds, start, acc = [], 0, 0
    for i, wb in enumerate(weights):
        if i > start and acc + wb > cap:
            bounds.append((start, i))
            start, acc = i, 0
        acc += wb
    bounds.append((start, len(weights)))
    return tuple(bounds)


def _pack_counts(layers: int) -> list[int]:
    counts, c = [], 1
    while c < layers:
        counts.append(c)
        c = max(c + 1, int(c * 1.5))
    return counts + [layers]


def bound_options(request: PlanRequest) -> tuple[list[Bounds], Placement | None]:
    """The pack boundaries to try, and the one placement to keep if the request fixes it
    (the given plan's; one device-resident pack for ``schedule="resident"``; None: try the
    families of :func:`placement_families`)."""
    if request.fixed is not None:
        return [request.fixed[0]], request.fixed[1]
    L = len(request.profiles)
    if request.schedule == "resident":
        return [((0, L),)], Placement.uniform(1, Loc.DEVICE)
    weights = [lp.w_bytes for lp in request.profiles]
    return list(dict.fromkeys(greedy_bounds(weights, c) for c in _pack_counts(L))), None


def placement_families(request: PlanRequest, bounds: list[Bounds]) -> list[list[Candidate]]:
    """The placement families over ``bounds``, in the order the planner tries them (see the
    module docstring)."""
    profiles, k_ratio = request.profiles, request.k_ratio
    device_budget, host_budget = request.device_budget, request.host_budget
    tiers = [(Loc.DEVICE, Loc.DEVICE), (Loc.HOST, Loc.DEVICE), (Loc.HOST, Loc.HOST)]
    if request.nvme:
        tiers += [(Loc.NVME, Loc.DEVICE), (Loc.NVME, Loc.HOST), (Loc.NVME, Loc.NVME)]
    options: list[list[Candidate]] = []
    for wk, x in tiers:
        if wk is Loc.HOST and device_budget is not None:
            # Before every pack leaves the device: keep as many as fit resident (they
            # move nothing and update on the device), the others on the host.
            options.append([(b, _resident_placement(b, keep, x)) for b in bounds
                            for keep in _resident_sets(profiles, b, k_ratio, device_budget)])
        options.append([(b, Placement.uniform(len(b), wk, x)) for b in bounds])
        if request.nvme and wk is Loc.NVME and host_budget is not None:
            # Before everything goes to NVMe: keep as many packs on the host as fit.
            options.insert(-1, [(b, _split_placement(b, j, x)) for b in bounds
                                for j in _host_pack_counts(profiles, b, k_ratio, host_budget)])
    return options


_ORDER = (Loc.DEVICE, Loc.HOST, Loc.NVME)


def slowest(placement: Placement) -> Loc:
    """The farthest tier from the device that holds some pack's weights."""
    return max(placement.w, key=_ORDER.index)


def _split_placement(bounds: Bounds, on_host: int, x: Loc) -> Placement:
    """The last ``on_host`` packs' W and K on the host (their updates come first in the
    backward pass), the others on NVMe; activations at ``x``."""
    n = len(bounds)
    wk = tuple(Loc.NVME if p < n - on_host else Loc.HOST for p in range(n))
    return Placement(wk, wk, (x,) * n)


def _resident_placement(bounds: Bounds, keep: frozenset[int], x: Loc) -> Placement:
    """Packs in ``keep`` wholly on the device; the others' W and K on the host, X at ``x``."""
    wk = tuple(Loc.DEVICE if p in keep else Loc.HOST for p in range(len(bounds)))
    xs = tuple(Loc.DEVICE if p in keep else x for p in range(len(bounds)))
    return Placement(wk, wk, xs)


def _resident_sets(profiles: list[LayerProfile], bounds: Bounds, k_ratio: float,
                   device_budget: int) -> list[frozenset[int]]:
    """A few sets of packs whose W, G and K could stay on the device within a half or three
    quarters of its budget (the rest is left for the swapped packs and the activations): the
    last packs first (their updates come first), or the largest first (the most bytes kept off
    the link). The simulator decides which, if any, fits best."""
    n = len(bounds)
    if n < 2:
        return []
    state = [sum(lp.w_bytes + lp.g_bytes + k_ratio * lp.g_bytes for lp in profiles[a:b])
             for a, b in bounds]
    last_first, largest_first = list(reversed(range(n))), sorted(range(n), key=lambda p: -state[p])
    sets = {_take(state, last_first, device_budget * 0.5),
            _take(state, last_first, device_budget * 0.75),
            _take(state, largest_first, device_budget * 0.75)}
    return [s for s in sets if 0 < len(s) < n]


def _take(state: list[float], order: list[int], room: float) -> frozenset[int]:
    """The packs, in ``order``, whose ``state`` bytes fit in what ``room`` has left."""
    kept: set[int] = set()
    for p in order:
        if state[p] <= room:
            kept.add(p)
            room -= state[p]
    return frozenset(kept)


def _host_pack_counts(profiles: list[LayerProfile], bounds: Bounds, k_ratio: float,
                      host_budget: int) -> list[int]:
    """A few counts of packs (from the last) whose W and K could stay on the host."""
    total, fit = 0.0, 0
    for a, b in reversed(bounds):
        total += sum(lp.w_bytes + k_ratio * lp.g_bytes for lp in profiles[a:b])
        if total > host_budget:
            break
        fit += 1
    fit = min(fit, len(bounds) - 1)  # all of them is the uniform host placement
    return sorted({c for c in (fit, fit - 1, fit // 2) if c > 0}, reverse=True)


def may_fit(sizes: Sizes, placement: Placement, device_budget: int | None,
            host_budget: int | None) -> bool:
    """False when the weights and optimizer state at their homes alone exceed a budget."""
    at = dict.fromkeys(Loc, 0)
    for p in range(placement.packs):
        at[placement.w[p]] += sizes.w[p]
        at[placement.k[p]] += sizes.k[p]
    return (device_budget is None or at[Loc.DEVICE] <= device_budget) and \
        (host_budget is None or at[Loc.HOST] <= host_budget)
