"""An event-driven simulator of a lowered schedule: peak bytes per tier, bytes per link, time.

With K on NVMe, a pack's master weights and optimizer state are read into host memory from its
first backward on (so the reads hide behind the backward) and written back after its update,
in chunks when ``Sizes.chunks`` splits the pack (as :mod:`harmony.runtime.chunked_update` streams
them): the first two chunks are read from the pack's first backward on; before chunk i steps,
chunk i-2's writes are waited for and its bytes released, and chunk i+1 is read; each chunk's
step takes its share (by bytes) of the update's time; the host holds at most three chunks.

Model (the one the runtime follows): one host thread issues tasks in order. A compute task starts
when the thread reaches it and every value it reads has arrived, and occupies the thread for its
duration (an update whose optimizer state is off the device runs on the host the same way). A
data move starts when issued and its link is free (each link is a FIFO queue, like a copy
stream), and takes bytes / bandwidth. Memory is charged when a value appears on a tier (a
swap-in is charged when issued, compute outputs when the task runs, plus the task's working
bytes while it runs) and released when freed. A forward group (``F1.0-3``) runs as one task
that reads and makes every micro-batch's value, for its own time and working bytes
(:meth:`Times.forward`, :meth:`Sizes.forward_work`). The input batch (X of pack 0) is the
caller's and is not charged at its home. With data parallelism (``ranks`` > 1) an
all-reduce ``&G p`` moves :func:`schedules.data_parallel.ring_bytes` over the
``"allreduce"`` link once G p is ready, and whatever reads G p afterwards waits for it.

With ``overlap_updates``, the update of a pack whose K lives on the host or on NVMe runs on a
worker (``harmony.runtime.update_worker``): the thread goes on once the update has started, the
update ends ``times.upd`` later on the worker (streamed chunk by chunk from NVMe, on its own clock),
and the next update, the pack's weight broadcast or load, and the step's end wait for it; the
pack's G stays at home until then. An NVMe pack's update holds, from its start until it is
joined, the host bytes of its three largest consecutive chunks (the runtime's reservation),
not each chunk as it goes. Not with tied weights on NVMe (those updates run in line).

A pipeline rank's schedule charges only its own packs' weights and optimizer state. Its SEND
and RECV move the value's bytes over the link between the two ranks (``"rank0->rank1"``); a
received value is charged on the device when the RECV is issued. This per-rank model assumes
the sender is ready (it does not see the other ranks, so it shows no pipeline bubble).

With ``staging`` (a GPU: the NVMe store reads and writes host memory only), a value moving
between NVMe and the device passes through a host staging buffer: a swap-in's buffer is
charged on the host from its issue until the first compute task that reads the value, a
swap-out's from its issue until the end of the next compute task (by then its copy to the host
has been issued and the file write follows). The link is still timed as one hop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from schedules.data_parallel import ALLREDUCE_LINK, BROADCAST_LINK, REDUCE_LINK, ring_bytes
from schedules.effects import effect, updates_after_backward
from schedules.pipeline import RANK_BANDWIDTH, peer_link
from schedules.schedule import Schedule
from schedules.task import Kind, Loc, Op, Ref


@dataclass(frozen=True)
class Sizes:
    """Bytes of every value of a step, per pack (and per micro-batch for X, D, S, work).

    ``work[p][m]`` is the transient working memory of FWD/BWD of pack p on micro-batch m
    (activations alive inside the pack while it computes), charged only while the task runs;
    a forward group's is :meth:`forward_work`.
    """

    w: Sequence[int]
    g: Sequence[int]
    k: Sequence[int]
    x: Sequence[Sequence[int]]
    d: Sequence[Sequence[int]]
    s: Sequence[Sequence[int]]
    work: Sequence[Sequence[int]]
    # Tied weights: (sharer pack, owner pack, bytes) for each sharer's gradient of a tied
    # weight, held where the sharer's update runs from its update until the owner's.
    held: Sequence[tuple[int, int, int]] = ()
    # Per pack, (W bytes, K bytes) of each chunk an NVMe-homed update streams; empty (or an
    # empty entry): the whole pack as one chunk, (w[p], k[p]).
    chunks: Sequence[Sequence[tuple[int, int]]] = ()

    def chunks_of(self, p: int) -> list[tuple[int, int]]:
        """Pack ``p``'s chunks: ``(W bytes, K bytes)`` each."""
        given = self.chunks[p] if p < len(self.chunks) else ()
        return [tuple(c) for c in given] or [(self.w[p], self.k[p])]  # type: ignore[misc]

    def of(self, ref: Ref) -> int:
        if ref.kind is Kind.W:
            return self.w[ref.pack]
        if ref.kind is Kind.G:
            return self.g[ref.pack]
        if ref.kind is Kind.K:
            return self.k[ref.pack]
        assert ref.mb is not None
        table = {Kind.X: self.x, Kind.D: self.d, Kind.S: self.s}[ref.kind]
        return table[ref.pack][ref.mb]

    def forward_work(self, pack: int, mbs: Sequence[int]) -> int:
        """Working bytes of one forward of ``pack`` over micro-batches ``mbs``: the layers'
        working memory at the group's samples (working memory grows with the samples, so it
        is the sum of the micro-batches'), and for a group of several, the input their inputs
        are concatenated into."""
        work = sum(self.work[pack][m] for m in mbs)
        return work + (sum(self.x[pack][m] for m in mbs) if len(mbs) > 1 else 0)


@dataclass(frozen=True)
class Times:
    """Seconds per compute task and bytes per second per link (``"host->device"``, ...).

    ``fwd_group[(p, first, last)]``: seconds of one forward of pack p over micro-batches
    first..last together (a forward group); a group not listed takes as long as its
    micro-batches' forwards one after the other.
    """

    fwd: Sequence[Sequence[float]]
    bwd: Sequence[Sequence[float]]
    upd: Sequence[float]
    bandwidth: dict[str, float]
    fwd_group: Mapping[tuple[int, int, int], float] = field(default_factory=dict)

    def forward(self, pack: int, mbs: Sequence[int]) -> float:
        """Seconds of one forward of ``pack`` over micro-batches ``mbs`` (consecutive)."""
        if len(mbs) == 1:
            return self.fwd[pack][mbs[0]]
        key = (pack, mbs[0], mbs[-1])
        if key in self.fwd_group:
            return self.fwd_group[key]
        return sum(self.fwd[pack][m] for m in mbs)


@dataclass
class SimResult:
    """What one simulated step gives.

    peak: highest bytes held per tier. bytes_moved: per link. bytes_by_kind: per (link, kind).
    step_time: seconds (None without :class:`Times`). timeline: bytes per tier after each task.
    """

    peak: dict[Loc, int]
    bytes_moved: dict[str, int]
    bytes_by_kind: dict[tuple[str, str], int]
    step_time: float | None
    timeline: list[dict[Loc, int]] = field(repr=False, default_factory=list)


def link(src: Loc, dst: Loc) -> str:
    """The name of the link a copy from ``src`` to ``dst`` uses, e.g. ``"host->device"``."""
    return f"{src.value}->{dst.value}"


def simulate(schedule: Schedule, sizes: Sizes, times: Times | None = None,
             ranks: int = 1, owned: Collection[int] | None = None,
             staging: bool = False, overlap_updates: bool = False) -> SimResult:
    """Replay a lowered ``schedule`` with ``sizes`` (and ``times``, for a step time).

    ``ranks``: data-parallel ranks the all-reduces (``&G p`` tasks) sum over; one rank's
    traffic and time are simulated (``times.bandwidth["allreduce"]`` is its all-reduce rate).
    A sharded optimizer's reduce ``^G p`` moves G p's bytes (``"reduce"`` link) and its
    broadcast ``*W p`` W p's bytes (``"broadcast"``), at the all-reduce rate unless
    ``times.bandwidth`` names those links; its K sizes are 0 for packs this rank does not own.
    ``owned``: the packs this rank updates (None: all); another rank's pack homed on NVMe
    reads nothing for its update, and its broadcast weights are written to its file.
    ``staging``: NVMe <-> device moves hold a host staging buffer (see the module docstring).
    ``overlap_updates``: updates of packs whose K is on the host or NVMe overlap what
    follows (see above; not with ``owned``, a sharded optimizer).

    >>> from schedules.generators import harmony
    >>> from schedules.lower import lower
    >>> from schedules.placement import Placement
    >>> s = lower(harmony(2, 1), Placement.uniform(2, Loc.HOST))
    >>> z = [[0], [0]]
    >>> r = simulate(s, Sizes([4, 4], [4, 4], [8, 8], z, z, z, z))
    >>> r.bytes_by_kind[("host->device", "W")]
    8
    """
    if schedule.placement is None:
        raise ValueError("simulate needs a lowered schedule (see schedules.lower.lower)")
    placement, P = schedule.placement, schedule.packs
    used: dict[Loc, int] = defaultdict(int)
    peak: dict[Loc, int] = defaultdict(int)
    moved: dict[str, int] = defaultdict(int)
    by_kind: dict[tuple[str, str], int] = defaultdict(int)
    timeline: list[dict[Loc, int]] = []
    home_charged: set[Ref] = set()

    def charge(loc: Loc, n: int) -> None:
        used[loc] += n
        peak[loc] = max(peak[loc], used[loc])

    def home(ref: Ref) -> Loc:
        return placement.home(ref.kind, ref.pack)

    for p in schedule.local_packs:
        for kind in (Kind.W, Kind.K):
            ref = Ref(kind, p)
            charge(home(ref), sizes.of(ref))
            home_charged.add(ref)
    for loc in Loc:
        charge(loc, 0)

    clock = 0.0
    link_free: dict[str, float] = defaultdict(float)
    ready: dict[tuple[Ref, Loc], float] = defaultdict(float)
    grads: set[int] = set()
    on_device: set[Ref] = {r for r in home_charged if home(r) is Loc.DEVICE}

    # pack -> (its chunks, when each chunk's reads end) for the chunks read so far (K on NVMe)
    staged: dict[int, tuple[list[tuple[int, int]], list[float]]] = {}
    early = updates_after_backward(schedule.tasks)

    def transfer(name: str, kind: Kind, n: int, after: float) -> float:
        moved[name] += n
        by_kind[(name, kind.value)] += n
        if times is None:
            return 0.0
        begin = max(clock, link_free[name], after)
        if name.startswith("rank"):  # between pipeline ranks: a measured link, else assumed
            bandwidth = times.bandwidth.get(name, times.bandwidth.get("rank->rank",
                                                                      RANK_BANDWIDTH))
        elif name in (REDUCE_LINK, BROADCAST_LINK):  # the all-reduce's rate unless given
            bandwidth = times.bandwidth.get(name, times.bandwidth[ALLREDUCE_LINK])
        else:
            bandwidth = times.bandwidth[name]
        link_free[name] = begin + n / bandwidth
        return link_free[name]

    def read_chunk(p: int, after: float, reserved: bool = False) -> None:
        """Charge (unless ``reserved``) and read pack ``p``'s next chunk (W, then K) into
        host memory."""
        chunks, ready = staged[p]
        w, k = chunks[len(ready)]
        if not reserved:
            charge(Loc.HOST, w + k)
        name = link(Loc.NVME, Loc.HOST)
        transfer(name, Kind.W, w, after)
        ready.append(transfer(name, Kind.K, k, after))

    def stage(p: int) -> None:
        staged[p] = (sizes.chunks_of(p), [])
        for _ in range(min(2, len(staged[p][0]))):
            read_chunk(p, 0.0)

    def chunked_update(p: int, start: float, behind: bool) -> tuple[float, int]:
        """Pack ``p``'s update streamed chunk by chunk from ``start``; returns its end and,
        ``behind`` (on the update worker), the host bytes it reserved until it is joined
        (the most three consecutive chunks hold, charged as it starts)."""
        nonlocal clock
        chunks, ready = staged[p]
        total = sum(w + k for w, k in chunks) or 1
        upd = times.upd[p] if times is not None else 0.0
        reserved = 0
        if behind:
            held = [w + k for w, k in chunks]
            reserved = max(sum(held[max(0, j - 2):j + 1]) for j in range(len(held)))
            charge(Loc.HOST, reserved - sum(held[:len(ready)]))
        t = start
        written: list[float] = []
        out = link(Loc.HOST, Loc.NVME)
        for i, (w, k) in enumerate(chunks):
            if i + 1 < len(chunks) and len(ready) == i + 1:
                if i >= 2:  # its writes end before its bytes serve chunk i + 1
                    t = max(t, written[i - 2])
                    if not behind:
                        used[Loc.HOST] -= sum(chunks[i - 2])
                clock = t
                read_chunk(p, t, reserved=behind)
            t = max(t, ready[i]) + upd * (w + k) / total
            clock = t
            transfer(out, Kind.W, w, t)
            written.append(transfer(out, Kind.K, k, t))
        # written behind: the host copies are released when the writes end
        if not behind:
            used[Loc.HOST] -= sum(w + k for w, k in chunks[max(0, len(chunks) - 3):])
        del staged[p]
        return t, reserved

    # overlap_updates: the update in flight (pack, when it ends on the worker), and the
    # gradients whose release waits for it
    pending: list[tuple[int, float, int]] = []  # (pack, its end, host bytes it reserved)
    deferred: list[Ref] = []

    def join() -> None:
        nonlocal clock
        if not pending:
            return
        _, end, reserved = pending.pop()
        clock = max(clock, end)
        used[Loc.HOST] -= reserved
        for ref in deferred:
            used[home(ref)] -= sizes.of(ref)
            home_charged.discard(ref)
        deferred.clear()

    updated: set[int] = set()
    holding: list[tuple[int, Loc, int]] = []  # (owner, tier, bytes) of held tied gradients
    staged_in: dict[Ref, int] = {}  # staging: host bytes of NVMe swap-ins not yet read
    staged_out = 0  # staging: host bytes of NVMe swap-outs, until the next compute task ends
    for t in schedule.tasks:
        if t.op.is_comm:
            ref = t.ref
            n = sizes.of(ref)
            if t.op is Op.RECV:
                charge(Loc.DEVICE, n)
                on_device.add(ref)
                ready[(ref, Loc.DEVICE)] = transfer(peer_link(schedule.rank, t), ref.kind, n, 0.0)
            else:  # sent behind: compute goes on while the bytes travel
                transfer(peer_link(schedule.rank, t), ref.kind, n, ready[(ref, Loc.DEVICE)])
            timeline.append(dict(used))
            continue
        if t.op.is_compute:
            p = t.pack
            nvme_k = placement.k[p] is Loc.NVME and (owned is None or p in owned)
            behind = overlap_updates and t.op is Op.UPD and owned is None and (
                placement.k[p] is Loc.HOST or (nvme_k and not sizes.held))
            if t.op is Op.UPD:
                join()  # one update at a time
            if nvme_k and p not in staged and (
                    (t.op is Op.BWD and p not in grads and p in early) or t.op is Op.UPD):
                # The update's inputs stream in from NVMe while the pack's backward runs
                # (or, with deferred updates, just before the update).
                stage(p)
            e = effect(t, P, schedule.recompute, placement, t.pack in grads)
            for r, _ in e.reads:
                used[Loc.HOST] -= staged_in.pop(r, 0)
            start = max([clock] + [ready[(r, loc)] for r, loc in e.reads])
            if t.op is Op.FWD:
                work = sizes.forward_work(p, t.mbs)
            else:
                work = sizes.work[p][t.mb] if t.mb is not None else 0
            charge(Loc.DEVICE, work)
            for ref in e.produces:
                charge(Loc.DEVICE, sizes.of(ref))
                on_device.add(ref)
            used[Loc.DEVICE] -= work
            if t.op is Op.UPD:
                grads.discard(t.pack)
                updated.add(p)
                # tied gradients are put aside (or merged) as the update begins
                for sharer, owner, n in sizes.held:
                    if sharer == p and owner not in updated:
                        charge(placement.update_loc(sharer), n)
                        holding.append((owner, placement.update_loc(sharer), n))
                    elif owner == p:
                        for held in [h for h in holding if h[0] == p]:
                            holding.remove(held)
                            used[held[1]] -= held[2]
                reserved = 0
                if nvme_k:
                    end, reserved = chunked_update(p, start, behind)
                else:
                    end = start + (times.upd[p] if times is not None else 0.0)
                if behind:  # on the worker: the thread goes on
                    pending.append((p, end, reserved))
                    end = start
            if times is not None:
                if t.op is Op.FWD:
                    clock = start + times.forward(p, t.mbs)
                elif t.op is Op.BWD:
                    assert t.mb is not None
                    clock = start + times.bwd[t.pack][t.mb]
                else:
                    clock = end
                for ref in e.produces:
                    ready[(ref, Loc.DEVICE)] = clock
                for ref in e.updates:
                    ready[(ref, Loc.DEVICE)] = clock
            used[Loc.HOST] -= staged_out
            staged_out = 0
            if t.op is Op.BWD:
                grads.add(t.pack)
        else:
            ref = t.ref
            n = sizes.of(ref)
            h = home(ref)
            if t.op is Op.ALLREDUCE:  # in place on the device; readers wait for its end
                at = (ref, Loc.DEVICE)
                ready[at] = transfer(ALLREDUCE_LINK, ref.kind, ring_bytes(n, ranks), ready[at])
                timeline.append(dict(used))
                continue
            if t.op is Op.REDUCE:  # onto the owner, in place on the device: G bytes
                at = (ref, Loc.DEVICE)
                ready[at] = transfer(REDUCE_LINK, ref.kind, n, ready[at])
                timeline.append(dict(used))
                continue
            if (t.op is Op.BROADCAST or (t.op is Op.SWAP_IN and ref.kind is Kind.W)) \
                    and pending and pending[0][0] == ref.pack:
                join()  # the update of these weights ends first
            if t.op is Op.BROADCAST and h is Loc.NVME and len(sizes.chunks_of(ref.pack)) > 1:
                # chunk by chunk, one in host memory at a time: the owner reads each back from
                # its file, the others write what they receive to theirs
                mine = owned is None or ref.pack in owned
                for w, _ in sizes.chunks_of(ref.pack):
                    charge(Loc.HOST, w)
                    after = transfer(link(Loc.NVME, Loc.HOST), ref.kind, w, clock) if mine \
                        else clock
                    arrived = transfer(BROADCAST_LINK, ref.kind, w, after)
                    if not mine:
                        transfer(link(Loc.HOST, Loc.NVME), ref.kind, w, arrived)
                    used[Loc.HOST] -= w
                timeline.append(dict(used))
                continue
            if t.op is Op.BROADCAST:  # the updated W from its owner, after the update
                arrived = transfer(BROADCAST_LINK, ref.kind, n, clock)
                if owned is not None and ref.pack not in owned and h is Loc.NVME:
                    # received into host memory, then written to the weights' file
                    charge(Loc.HOST, n)
                    transfer(link(Loc.HOST, Loc.NVME), ref.kind, n, arrived)
                    used[Loc.HOST] -= n
                timeline.append(dict(used))
                continue
            if staging and h is Loc.NVME and t.op in (Op.SWAP_IN, Op.SWAP_OUT):
                charge(Loc.HOST, n)
                if t.op is Op.SWAP_IN:
                    staged_in[ref] = staged_in.get(ref, 0) + n
                else:
                    staged_out += n
            if t.op is Op.SWAP_IN:
                charge(Loc.DEVICE, n)
                on_device.add(ref)
                name = link(h, Loc.DEVICE)
            elif t.op is Op.SWAP_OUT:
                used[Loc.DEVICE] -= n
                on_device.discard(ref)
                if ref not in home_charged and not (ref.kind is Kind.X and ref.pack == 0):
                    charge(h, n)
                    home_charged.add(ref)
                name = link(Loc.DEVICE, h)
            else:
                if ref in on_device:
                    used[Loc.DEVICE] -= n
                    on_device.discard(ref)
                if t.op is Op.DEL and ref in home_charged and pending \
                        and pending[0][0] == ref.pack and ref.kind is Kind.G:
                    deferred.append(ref)  # its update still reads it
                elif t.op is Op.DEL and ref in home_charged:
                    used[h] -= n
                    home_charged.discard(ref)
                timeline.append(dict(used))
                continue
            src = (ref, h if t.op is Op.SWAP_IN else Loc.DEVICE)
            dst = (ref, Loc.DEVICE if t.op is Op.SWAP_IN else h)
            ready[dst] = transfer(name, ref.kind, n, ready[src])
        timeline.append(dict(used))

    join()  # (the step ends with the last update)
    timeline[-1:] = [dict(used)] if timeline else []
    step = None
    if times is not None:
        step = max([clock] + list(link_free.values()))
    return SimResult(dict(peak), dict(moved), dict(by_kind), step, timeline)
