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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from harmony.planning.chunks import item_bytes, profile_chunks
from harmony.planning.groups import group_sizes, grouped_packs, pack_forward_seconds, ungrouped
from harmony.planning.microbatch import micro_batch_sizes
from harmony.planning.profile import LayerProfile, scaled
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

Tied = tuple[tuple[int, ...], int]  # (layers using one weight, bytes of its gradient)


class InfeasiblePlan(ValueError):
    """No plan fits the budgets. ``device_needed`` / ``host_needed``: what the most frugal plan
    needs on each tier (bytes), so a caller can retry with a budget that works."""

    def __init__(self, message: str, device_needed: int, host_needed: int) -> None:
        super().__init__(message)
        self.device_needed, self.host_needed = device_needed, host_needed


@dataclass(frozen=True)
class Plan:
    """Pack boundaries, placement, prefetch depth, the lowered schedule and its prediction."""

    bounds: tuple[tuple[int, int], ...]   # [start, stop) layer indices per pack
    schedule: Schedule                    # lowered
    sizes: Sizes
    predicted: SimResult
    # Sharded optimizer: the rank owning each pack's optimizer state (None: every rank)
    owners: tuple[int, ...] | None = None
    # Micro-batches per forward task in the packs that may group (1: a forward per
    # micro-batch), and the packs that may not: (pack, its first layer that cannot, why).
    forward_group: int = 1
    ungrouped: tuple[tuple[int, int, str], ...] = ()
    # NVMe-homed packs stream their updates in chunks of at most this many bytes of W and K
    # (harmony.planning.chunks, harmony.runtime.chunked_update); None: each update holds its
    # whole pack
    update_chunk: int | None = None
    # Host- and NVMe-homed packs' updates run on the update worker (harmony.runtime.update_worker),
    # as planned with Trainer(overlap_updates=True) where that fits the host budget
    overlap_updates: bool = False

    @property
    def placement(self) -> Placement:
        assert self.schedule.placement is not None
        return self.schedule.placement

    def describe(self, names: list[str]) -> str:
        lines = [f"schedule {self.schedule.name}, {len(self.bounds)} packs, "
                 f"{self.schedule.micro_batches} micro-batches, prefetch {self.schedule.prefetch}"]
        for p, (a, b) in enumerate(self.bounds):
            lines.append(f"  pack {p}: layers {a}..{b - 1} ({names[a]}..{names[b - 1]}), "
                         f"W {fmt_bytes(self.sizes.w[p])} at {self.placement.w[p].value}, "
                         f"X at {self.placement.x[p].value}")
        if self.update_chunk is not None:
            counts = ", ".join(f"pack {p} in {len(self.sizes.chunks_of(p))}"
                               for p in range(len(self.bounds))
                               if self.placement.k[p] is Loc.NVME)
            lines.append(f"  NVMe updates stream in chunks of at most "
                         f"{fmt_bytes(self.update_chunk)}: {counts}")
        if self.overlap_updates:
            lines.append("  updates of packs whose optimizer state is off the device run on "
                         "the update worker, behind the next pack's backward")
        if self.forward_group > 1:
            lines += self._describe_groups(names)
        peaks = ", ".join(f"{k.value} {fmt_bytes(v)}" for k, v in self.predicted.peak.items())
        lines.append(f"  predicted peak: {peaks}")
        return "\n".join(lines)

    def _describe_groups(self, names: list[str]) -> list[str]:
        g = self.forward_group
        grouped = sorted({t.pack for t in self.schedule.tasks if len(t.mbs) > 1})
        lines = [f"  forward groups of {g} micro-batches: "
                 + (f"packs {', '.join(map(str, grouped))}" if grouped else "no pack")]
        if len(self.bounds) == 1:
            lines[-1] += " (the only pack runs its forward inside its backward)"
        lines += [f"    pack {p} one micro-batch at a time: layer {i} ({names[i]!r}) {why}"
                  for p, i, why in self.ungrouped]
        return lines



def pack_sizes(profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
               micro_batches: list[int], k_ratio: float,
               tied: Sequence[Tied] = ()) -> Sizes:
    """Bytes of every value of a step for these pack boundaries and micro-batch sizes.

    ``tied``: weights used by several layers. Each pack using one holds it (a copy in the
    packs after the first); only the first pack's optimizer holds state for it, and each
    later pack's gradient of it may be held until the first pack's update (``Sizes.held``).
    """
    pack_of = [p for p, (a, b) in enumerate(bounds) for _ in range(a, b)]
    untrained = [0] * len(bounds)  # gradient bytes of tied copies, per pack
    held = []
    for layers_using, nbytes in tied:
        packs = sorted({pack_of[i] for i in layers_using})
        for sharer in packs[1:]:
            untrained[sharer] += nbytes
            held.append((sharer, packs[0], nbytes))
    w, g, k, x, d, s, work = [], [], [], [], [], [], []
    for p, (a, b) in enumerate(bounds):
        layers = profiles[a:b]
        w.append(sum(lp.w_bytes for lp in layers))
        g.append(sum(lp.g_bytes for lp in layers))
        k.append(int(math.ceil(k_ratio * max(g[-1] - untrained[p], 0))))
        saved = sum(lp.saved_bytes for lp in layers)
        # Beside every layer's saved tensors, one layer's transient bytes at a time: twice the
        # largest output, or more where a layer was measured to need more (CUDA profiles).
        transient = max(max(2 * lp.out_bytes for lp in layers),
                        max(lp.work_bytes - lp.saved_bytes for lp in layers))
        x.append([scaled(layers[0].in_bytes, n) for n in micro_batches])
        d.append([scaled(layers[0].in_grad_bytes, n) if p else 0 for n in micro_batches])
        s.append([scaled(saved, n) for n in micro_batches])
        work.append([scaled(saved + transient, n) for n in micro_batches])
    return Sizes(w, g, k, x, d, s, work, tuple(held))


def chunked(sizes: Sizes, profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
            k_ratio: float, update_chunk: int | None) -> Sizes:
    """``sizes`` with each pack's NVMe update split into chunks of at most ``update_chunk``
    bytes of W and K (:func:`harmony.planning.chunks.profile_chunks`, the split the runtime makes
    from the pack's layout); None, or a pack that is one chunk: the whole pack, ``(w[p], k[p])``,
    less its frozen parameters, which an update neither reads nor writes."""
    frozen = [sum(lp.frozen_bytes for lp in profiles[a:b]) for a, b in bounds]
    if update_chunk is None and not any(frozen):
        return dataclasses.replace(sizes, chunks=())
    out = []
    for p, (a, b) in enumerate(bounds):
        parts = profile_chunks([(lp.params, lp.w_bytes, lp.g_bytes, lp.frozen_bytes)
                                for lp in profiles[a:b]], update_chunk, k_ratio) \
            if update_chunk is not None else []
        out.append(tuple(parts) if len(parts) > 1
                   else ((sizes.w[p] - frozen[p], sizes.k[p]),))
    return dataclasses.replace(sizes, chunks=tuple(out))


def chunk_options(update_chunk: int | str | None, profiles: list[LayerProfile],
                  bounds: tuple[tuple[int, int], ...], placement: Placement, sizes: Sizes,
                  k_ratio: float) -> list[int | None]:
    """The chunk budgets to try for a candidate, most generous first: ``[None]`` without an
    NVMe-homed pack; the given budget; for ``"smaller"``, a quarter, an eighth, ... of the
    largest NVMe pack's W + K (fewer than four chunks hold as much as the whole pack: three
    are in host memory at once), down to its largest parameter."""
    nvme = [p for p in range(placement.packs) if placement.k[p] is Loc.NVME]
    if not nvme or update_chunk is None:
        return [None]
    if isinstance(update_chunk, int):
        return [update_chunk]
    largest = max(sizes.w[p] + sizes.k[p] for p in nvme)
    biggest = max(max(item_bytes([w for w, _ in lp.params] or [lp.w_bytes],
                                 [g for _, g in lp.params] or [lp.g_bytes], 0, k_ratio))
                  for p in nvme for lp in profiles[bounds[p][0]:bounds[p][1]])
    options: list[int | None] = []
    chunk = largest // 4
    while chunk > 0:
        options.append(chunk)
        if chunk <= biggest:  # every parameter is a chunk already
            break
        chunk //= 2
    return options or [None]


def pack_times(profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
               micro_batches: list[int], upd_s_per_byte: float,
               bandwidth: dict[str, float], forward_group: int = 1) -> Times:
    """Seconds of every compute task, and the links' bandwidths; with ``forward_group`` > 1
    also of every pack's forward over each group of that many micro-batches
    (:func:`harmony.planning.groups.pack_forward_seconds`)."""
    fwd = [[pack_forward_seconds(profiles[a:b], n) for n in micro_batches] for a, b in bounds]
    bwd = [[sum(lp.bwd_s for lp in profiles[a:b]) * n for n in micro_batches] for a, b in bounds]
    upd = [sum(lp.g_bytes for lp in profiles[a:b]) * upd_s_per_byte for a, b in bounds]
    links = {**NVME_BANDWIDTH, **bandwidth}
    groups = {}
    M = len(micro_batches)
    for p, (a, b) in enumerate(bounds):
        for first in range(0, M if forward_group > 1 else 0, forward_group):
            last = min(first + forward_group, M) - 1
            if last > first:
                groups[(p, first, last)] = pack_forward_seconds(
                    profiles[a:b], sum(micro_batches[first:last + 1]))
    return Times(fwd, bwd, upd, links, groups)


# A plan with more traffic replaces one with less only when predicted this much faster: the
# predictions are good to about 10% (BENCHMARKS.md), and bytes moved cost more than time alone
# (shared links, SSD wear).
CLEARLY_FASTER = 0.05
# Assumed all-reduce bytes/s per rank until measured (the trainer measures it).
ALLREDUCE_BANDWIDTH = 5.0e9
# Assumed NVMe bandwidths (bytes/s) until measured: a PCIe 3 NVMe drive.
NVME_BANDWIDTH = {"nvme->device": 2.0e9, "device->nvme": 1.5e9, "nvme->host": 2.0e9,
                  "host->nvme": 1.5e9}


def greedy_bounds(weights: list[int], packs: int) -> tuple[tuple[int, int], ...]:
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


def plan(profiles: list[LayerProfile], schedule: str, micro_batches: list[int],
         device_budget: int | None, host_budget: int | None, k_ratio: float,
         bandwidth: dict[str, float], upd_s_per_byte: float = 1e-9,
         prefetch: int | None = None,
         fixed: tuple[tuple[tuple[int, int], ...], Placement] | None = None,
         nvme: bool = False, deferred_updates: bool = False,
         tied: Sequence[Tied] = (), ranks: int = 1, local_ranks: int = 1,
         shard: int | None = None, update_chunk: int | str | None = None,
         overlap_updates: bool = False, forward_group: int | None = 1,
         staging: bool = False) -> Plan:
    """The fastest predicted plan that fits the budgets.

    Args:
        profiles: one per layer, from :func:`harmony.planning.profile.profile_layers`.
        schedule: generator name. micro_batches: samples per micro-batch.
        device_budget, host_budget: bytes, None for no limit.
        k_ratio: optimizer-state bytes per parameter byte.
        bandwidth: bytes/s per link for the time prediction.
        prefetch: force a prefetch depth (None: try 1 then 0).
        fixed: keep these pack bounds and placement (re-planning a later step's shapes).
        nvme: whether an NVMe tier exists (then W, K and X may live there).
        deferred_updates: updates after the last backward (global-norm gradient clipping).
        tied: weights used by several layers: (the layers using one, its gradient bytes).
        ranks, local_ranks: data-parallel ranks in all and on this machine (see
            :mod:`schedules.data_parallel`): with ranks > 1 the schedules all-reduce each
            pack's gradients (at ``bandwidth["allreduce"]``, default
            :data:`ALLREDUCE_BANDWIDTH`), and this machine's ranks share its host and NVMe
            links.
        shard: this rank, when the optimizer state is sharded over the ranks (ranks > 1): each
            pack's owner (:func:`schedules.data_parallel.owners`, by K bytes) alone holds its
            K, so K is charged only for this rank's packs; the schedules reduce G to the owner
            and broadcast W from it (:func:`schedules.data_parallel.add_reduce_broadcast`).
        update_chunk: how NVMe-homed packs stream their updates through host memory: None,
            each update holds its whole pack's W and K; bytes, in chunks of at most that
            (:mod:`harmony.planning.chunks`); ``"auto"``, the plan of whole packs if one fits, else,
            per candidate, the largest of :func:`chunk_options` that fits (chunked updates
            read only two chunks behind the backward, so they are slower where both fit).
            ``Plan.update_chunk`` says which.
        overlap_updates: the updates of packs whose K is on the host or NVMe run behind
            what follows them (:mod:`harmony.runtime.update_worker`; see :func:`simulate`), unless
            only a plan updating in line fits (``Plan.overlap_updates`` says which).
        forward_group: micro-batches per forward task in the packs whose layers may group
            (``harmony`` only; :mod:`harmony.planning.groups`); None: choose (see the module
            docstring).
        staging: NVMe <-> device moves pass through host staging buffers (a CUDA device; see
            :func:`schedules.simulate.simulate`), charged against the host budget.

    Raises:
        InfeasiblePlan: nothing fits; the message gives the numbers and what to change.
        ValueError: a forward group that is not a positive int, or one with another schedule.
    """
    if forward_group is not None and (isinstance(forward_group, bool) or not isinstance(
            forward_group, int) or forward_group < 1):
        raise ValueError(f"forward_group={forward_group!r} must be a positive int or None")

    # Tried in order until one fits: with overlap_updates, every chunking on the worker
    # (an update there holds its host bytes while the next pack runs), then in line; with
    # update_chunk="auto", whole packs before chunks (see :func:`_search`).
    chunks = [None, "smaller"] if update_chunk == "auto" and nvme else [
        None if update_chunk == "auto" else update_chunk]
    failed: InfeasiblePlan | None = None
    for overlap in ([True, False] if overlap_updates else [False]):
        for chunk in chunks:
            try:
                found = _search(profiles, schedule, micro_batches, device_budget, host_budget,
                                k_ratio, bandwidth, upd_s_per_byte, prefetch, fixed, nvme,
                                deferred_updates, tied, ranks, local_ranks, shard, overlap,
                                forward_group, staging, chunk)
            except InfeasiblePlan as e:
                failed = e
                continue
            return dataclasses.replace(found, overlap_updates=overlap)
    assert failed is not None
    raise failed


def _search(profiles: list[LayerProfile], schedule: str, micro_batches: list[int],
            device_budget: int | None, host_budget: int | None, k_ratio: float,
            bandwidth: dict[str, float], upd_s_per_byte: float, prefetch: int | None,
            fixed: tuple[tuple[tuple[int, int], ...], Placement] | None, nvme: bool,
            deferred_updates: bool, tied: Sequence[Tied], ranks: int, local_ranks: int,
            shard: int | None, overlap_updates: bool, forward_group: int | None,
            staging: bool, update_chunk: int | str | None) -> Plan:
    """:func:`plan` for one choice of ``update_chunk`` (None, bytes, or ``"smaller"``: per
    candidate, the largest of :func:`chunk_options` that fits)."""
    L, M = len(profiles), len(micro_batches)
    group = forward_group or 1
    bandwidth = shared_bandwidth({**NVME_BANDWIDTH, ALLREDUCE_LINK: ALLREDUCE_BANDWIDTH,
                                  **bandwidth}, local_ranks)
    weights = [lp.w_bytes for lp in profiles]
    if fixed is not None:
        bound_options = [fixed[0]]
        placements = [fixed[1]]
    elif schedule == "resident":
        bound_options = [((0, L),)]
        placements = [Placement.uniform(1, Loc.DEVICE)]
    else:
        bound_options = list(dict.fromkeys(greedy_bounds(weights, c) for c in _pack_counts(L)))
        placements = []
    prefetches = [prefetch] if prefetch is not None else [1, 0]

    def excess(r: SimResult) -> tuple[float, float]:
        """How far over budget the device and then the host are (1.0: within budget). The
        most frugal plan minimises device excess first, so ``host_needed`` of the error is
        what the host needs once the device fits."""
        def ratio(peak: int, budget: int | None) -> float:
            if budget is None or peak <= budget:
                return 1.0
            return peak / budget if budget > 0 else 1.0 + peak  # (a zero budget: order by peak)

        return (ratio(r.peak.get(Loc.DEVICE, 0), device_budget),
                ratio(r.peak.get(Loc.HOST, 0), host_budget))

    def fits(r: SimResult) -> bool:
        return excess(r) == (1.0, 1.0)

    options: list[list[tuple[tuple[tuple[int, int], ...], Placement]]] = []
    if placements:
        options = [[(b, placements[0]) for b in bound_options]]
    else:
        tiers = [(Loc.DEVICE, Loc.DEVICE), (Loc.HOST, Loc.DEVICE), (Loc.HOST, Loc.HOST)]
        if nvme:
            tiers += [(Loc.NVME, Loc.DEVICE), (Loc.NVME, Loc.HOST), (Loc.NVME, Loc.NVME)]
        for wk, x in tiers:
            if wk is Loc.HOST and device_budget is not None:
                # Before every pack leaves the device: keep as many as fit resident (they
                # move nothing and update on the device), the others on the host.
                options.append([(b, _resident_placement(b, keep, x)) for b in bound_options
                                for keep in _resident_sets(profiles, b, k_ratio,
                                                           device_budget)])
            options.append([(b, Placement.uniform(len(b), wk, x)) for b in bound_options])
            if nvme and wk is Loc.NVME and host_budget is not None:
                # Before everything goes to NVMe: keep as many packs on the host as fit.
                options.insert(-1, [(b, _split_placement(b, j, x)) for b in bound_options
                                    for j in _host_pack_counts(profiles, b, k_ratio,
                                                               host_budget)])

    def lowered_plan(bounds: tuple[tuple[int, int], ...], placement: Placement, pf: int,
                     sizes: Sizes, times: Times, own: tuple[int, ...] | None, g: int,
                     chunks: Sequence[int | None] = (None,)) -> Plan:
        """The plan of these settings, with the first of ``chunks`` (most generous first)
        whose chunked updates fit (else the last)."""
        packs = grouped_packs(profiles, bounds) if g > 1 else frozenset()
        lowered = _lowered(schedule, len(bounds), M, deferred_updates, placement, pf, ranks,
                           own is not None, g, packs)
        for chunk in chunks:
            sized = chunked(sizes, profiles, bounds, k_ratio, chunk)
            result = simulate(lowered, sized, times, ranks, _owned(own, shard), staging,
                              overlap_updates)
            if fits(result):
                break
        return Plan(bounds, lowered, sized, result, own, g,
                    ungrouped(profiles, bounds) if g > 1 else (), chunk)

    def fitting_at(bounds: tuple[tuple[int, int], ...], pf: int, g: int, chunk: int | None,
                   ) -> Callable[[Placement], Plan | None]:
        """Plans with these bounds, prefetch depth, forward groups and update chunks: the one
        of a placement, if it fits."""
        sizes, own = _sharded(pack_sizes(profiles, bounds, micro_batches, k_ratio, tied),
                              ranks, shard)
        times = pack_times(profiles, bounds, micro_batches, upd_s_per_byte, bandwidth, g)

        def at(placement: Placement) -> Plan | None:
            candidate = lowered_plan(bounds, placement, pf, sizes, times, own, g, (chunk,))
            return candidate if fits(candidate.predicted) else None

        return at

    tried: list[tuple[SimResult, Plan] | None] = []  # every candidate, in order
    skipped: list[tuple[int, tuple[tuple[int, int], ...], Placement, int, Sizes, Times,
                        tuple[int, ...] | None, int | None]] = []
    chosen: Plan | None = None
    for candidates in options:
        if chosen is not None:
            # The first placement family that fits (the least traffic) decides the tier, but
            # a later family of the same tier may be clearly faster (keeping a pack resident
            # can cost more in activations than it saves in weights): try those near the
            # chosen pack count, and take one only if it beats the prediction's error.
            if not candidates or _slowest(candidates[0][1]) is not _slowest(chosen.placement):
                continue
            at = bound_options.index(chosen.bounds)
            near = bound_options[max(0, at - 1):at + 2]
            candidates = [(b, placement) for b, placement in candidates if b in near]
        best: Plan | None = None
        fitting: list[Plan] = []
        for bounds, placement in candidates:
            sizes, own = _sharded(pack_sizes(profiles, bounds, micro_batches, k_ratio, tied),
                                  ranks, shard)
            times = pack_times(profiles, bounds, micro_batches, upd_s_per_byte, bandwidth,
                               group)
            may_fit = _may_fit(sizes, placement, device_budget, host_budget)
            chunks = chunk_options(update_chunk, profiles, bounds, placement, sizes, k_ratio)
            for pf in prefetches:
                if tried and pf == 0 and len(prefetches) > 1 and tried[-1] is not None \
                        and fits(tried[-1][0]):
                    continue  # prefetching fits: not prefetching only waits longer
                if not may_fit:
                    # The simulator charges every W and K at its home before the first task,
                    # so this candidate cannot fit: lower and simulate it only if nothing fits.
                    skipped.append((len(tried), bounds, placement, pf, sizes, times, own,
                                    chunks[-1]))
                    tried.append(None)
                    continue
                candidate = lowered_plan(bounds, placement, pf, sizes, times, own, group,
                                         chunks)
                result = candidate.predicted
                tried.append((result, candidate))
                if fits(result):
                    assert result.step_time is not None
                    fitting.append(candidate)
                    if best is None or result.step_time < (best.predicted.step_time or 0.0):
                        best = candidate
        if best is not None and forward_group is None and schedule == "harmony":
            # Forward groups on the fastest few candidates (grouping adds device memory
            # only, so the placement stays the first that fits).
            fitting.sort(key=lambda c: c.predicted.step_time or 0.0)
            for c in fitting[:GROUP_CANDIDATES]:
                if not grouped_packs(profiles, c.bounds):
                    continue
                assert c.schedule.placement is not None and c.schedule.prefetch is not None
                previous = c.predicted.step_time or 0.0
                whole, own_c = _sharded(pack_sizes(profiles, c.bounds, micro_batches, k_ratio,
                                                   tied), ranks, shard)
                for g in group_sizes(M):
                    times = pack_times(profiles, c.bounds, micro_batches, upd_s_per_byte,
                                       bandwidth, g)
                    grouped = lowered_plan(c.bounds, c.schedule.placement,
                                           c.schedule.prefetch, whole, times, own_c, g,
                                           (c.update_chunk,))
                    step = grouped.predicted.step_time or 0.0
                    if not fits(grouped.predicted) or step >= previous:
                        break  # larger groups need more memory still, and gain less
                    previous = step
                    if step < (best.predicted.step_time or 0.0):
                        best = grouped
        if best is not None and (chosen is None or (best.predicted.step_time or 0.0)
                                 < (chosen.predicted.step_time or 0.0) * (1 - CLEARLY_FASTER)):
            chosen = best
    if chosen is not None:
        if fixed is not None or schedule == "resident":
            return chosen
        assert chosen.schedule.prefetch is not None
        return refine(chosen, fitting_at(chosen.bounds, chosen.schedule.prefetch,
                                         chosen.forward_group, chosen.update_chunk))
    for i, bounds, placement, pf, sizes, times, own, chunk in skipped:
        candidate = lowered_plan(bounds, placement, pf, sizes, times, own, group, (chunk,))
        tried[i] = (candidate.predicted, candidate)
    tightest: tuple[SimResult, Plan] | None = None
    for entry in tried:  # the same choice, in the same order, as without the shortcut
        assert entry is not None
        if tightest is None or excess(entry[0]) < excess(tightest[0]):
            tightest = entry
    assert tightest is not None
    peak = tightest[0].peak
    raise InfeasiblePlan(_infeasible(tightest[1], profiles, micro_batches, device_budget,
                                     host_budget, nvme),
                         peak.get(Loc.DEVICE, 0), peak.get(Loc.HOST, 0))


# How many of the fastest candidates the planner tries forward groups on, when it chooses.
GROUP_CANDIDATES = 6


_ORDER = (Loc.DEVICE, Loc.HOST, Loc.NVME)


def _slowest(placement: Placement) -> Loc:
    """The farthest tier from the device that holds some pack's weights."""
    return max(placement.w, key=_ORDER.index)


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

    def closer(placement: Placement, kind: str, frm: Loc, packs: list[int]) -> Placement:
        w, x = list(placement.w), list(placement.x)
        for p in packs:
            if kind == "x":
                x[p] = _CLOSER[frm]
            else:
                w[p] = _CLOSER[frm]
        return Placement(tuple(w), tuple(w), tuple(x))

    for kind, frm in (("x", Loc.NVME), ("wk", Loc.NVME), ("x", Loc.HOST), ("wk", Loc.HOST)):
        now = best.placement
        order = [p for p in reversed(range(now.packs))
                 if (now.x if kind == "x" else now.w)[p] is frm]
        lo, hi, start = 0, len(order), best  # bisect for the largest count that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            candidate = fitting(closer(now, kind, frm, order[:mid]))
            if candidate is None:
                hi = mid - 1
                continue
            lo = mid
            if _better(candidate.predicted, best.predicted, start.predicted):
                best = candidate
    return best


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


def _split_placement(bounds: tuple[tuple[int, int], ...], on_host: int, x: Loc) -> Placement:
    """The last ``on_host`` packs' W and K on the host (their updates come first in the
    backward pass), the others on NVMe; activations at ``x``."""
    n = len(bounds)
    wk = tuple(Loc.NVME if p < n - on_host else Loc.HOST for p in range(n))
    return Placement(wk, wk, (x,) * n)


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


def _resident_placement(bounds: tuple[tuple[int, int], ...], keep: frozenset[int],
                        x: Loc) -> Placement:
    """Packs in ``keep`` wholly on the device; the others' W and K on the host, X at ``x``."""
    wk = tuple(Loc.DEVICE if p in keep else Loc.HOST for p in range(len(bounds)))
    xs = tuple(Loc.DEVICE if p in keep else x for p in range(len(bounds)))
    return Placement(wk, wk, xs)


def _resident_sets(profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
                   k_ratio: float, device_budget: int) -> list[frozenset[int]]:
    """A few sets of packs whose W, G and K could stay on the device within a half or three
    quarters of its budget (the rest is left for the swapped packs and the activations): the
    last packs first (their updates come first), or the largest first (the most bytes kept off
    the link). The simulator decides which, if any, fits best."""
    n = len(bounds)
    if n < 2:
        return []
    state = [sum(lp.w_bytes + lp.g_bytes + k_ratio * lp.g_bytes for lp in profiles[a:b])
             for a, b in bounds]

    def take(order: list[int], room: float) -> frozenset[int]:
        kept: set[int] = set()
        for p in order:
            if state[p] <= room:
                kept.add(p)
                room -= state[p]
        return frozenset(kept)

    last_first, largest_first = list(reversed(range(n))), sorted(range(n), key=lambda p: -state[p])
    sets = {take(last_first, device_budget * 0.5), take(last_first, device_budget * 0.75),
            take(largest_first, device_budget * 0.75)}
    return [s for s in sets if 0 < len(s) < n]


def _host_pack_counts(profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
                      k_ratio: float, host_budget: int) -> list[int]:
    """A few counts of packs (from the last) whose W and K could stay on the host."""
    total, fit = 0.0, 0
    for a, b in reversed(bounds):
        total += sum(lp.w_bytes + k_ratio * lp.g_bytes for lp in profiles[a:b])
        if total > host_budget:
            break
        fit += 1
    fit = min(fit, len(bounds) - 1)  # all of them is the uniform host placement
    return sorted({c for c in (fit, fit - 1, fit // 2) if c > 0}, reverse=True)


def _may_fit(sizes: Sizes, placement: Placement, device_budget: int | None,
             host_budget: int | None) -> bool:
    """False when the weights and optimizer state at their homes alone exceed a budget."""
    at = dict.fromkeys(Loc, 0)
    for p in range(placement.packs):
        at[placement.w[p]] += sizes.w[p]
        at[placement.k[p]] += sizes.k[p]
    return (device_budget is None or at[Loc.DEVICE] <= device_budget) and \
        (host_budget is None or at[Loc.HOST] <= host_budget)


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
