"""Data parallelism as schedule passes: every rank runs the same schedule on its share.

N ranks each run the single-rank schedule over their own micro-batches; each pack's gradient
is summed over the ranks by an all-reduce (``&G2``) that starts when the pack's last backward
on this rank has finished and runs while the next pack's backward computes. What reads the
gradient afterwards (its copy to the update's tier, the update, global-norm clipping) waits
for it. Harmony, 3 packs, 2 micro-batches, everything on the device::

    single rank      ... B2.0 B2.1 U2 | B1.0 B1.1 U1 | B0.0 B0.1 U0
    data parallel    ... B2.0 B2.1 &G2 | B1.0 B1.1 &G1 U2 | B0.0 B0.1 &G0 U1 U0

:func:`lag_updates` (on the compute-only schedule) moves each just-in-time update behind the
next pack's backward so its all-reduce has that backward to hide behind; :func:`add_allreduce`
(on the lowered schedule) adds the all-reduces and keeps each gradient on the device until its
all-reduce had that time (a gradient written back to the host right after its backward would
make the copy wait for the all-reduce at once).

Sharded optimizer (:func:`add_reduce_broadcast`): each pack has one owner rank
(:func:`owners`); its gradient is reduced onto the owner (``^G p``) instead of all-reduced, only
the owner updates it, and the owner broadcasts the new weights (``*W p``) after ``U p``::

    sharded          ... B2.0 B2.1 ^G2 | B1.0 B1.1 ^G1 U2 *W2 | B0.0 B0.1 ^G0 U1 *W1 U0 *W0

Cost model: a reduce moves the gradient's bytes per rank (``"reduce"`` link), a broadcast the
weights' bytes (``"broadcast"`` link). A ring all-reduce of ``g`` bytes sends and receives
``2 (N-1) / N * g`` bytes per rank (:func:`ring_bytes`), on the ``"allreduce"`` link; ranks on
one machine share its host link and NVMe drive (:func:`shared_bandwidth`).
"""

from __future__ import annotations

from schedules.schedule import Schedule
from schedules.task import Kind, Op, Task

ALLREDUCE_LINK = "allreduce"
# Links every rank of one machine shares: its host memory bus / PCIe root and its NVMe drives.
SHARED_LINKS = ("host->device", "device->host", "nvme->device", "device->nvme",
                "nvme->host", "host->nvme")


def ring_bytes(nbytes: int, ranks: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``nbytes``.

    >>> ring_bytes(1000, 4), ring_bytes(1000, 1)
    (1500, 0)
    """
    if ranks < 1:
        raise ValueError(f"ranks={ranks} must be >= 1")
    return 2 * (ranks - 1) * nbytes // ranks


def shared_bandwidth(bandwidth: dict[str, float], local_ranks: int) -> dict[str, float]:
    """Per-rank bytes/s when ``local_ranks`` ranks of one machine share its host and NVMe links.

    >>> shared_bandwidth({"host->device": 8.0, "allreduce": 2.0}, 4)
    {'host->device': 2.0, 'allreduce': 2.0}
    """
    if local_ranks < 1:
        raise ValueError(f"local_ranks={local_ranks} must be >= 1")
    return {k: v / local_ranks if k in SHARED_LINKS else v for k, v in bandwidth.items()}


def lag_updates(schedule: Schedule) -> Schedule:
    """Move every update that directly follows its pack's backward behind the next pack's
    backward run, so the pack's all-reduce overlaps that backward (compute-only schedules).

    >>> from schedules.generators import harmony
    >>> str(lag_updates(harmony(3, 1)))
    'F0.0 F1.0 B2.0 B1.0 U2 B0.0 U1 U0'
    """
    if schedule.lowered:
        raise ValueError(f"lag_updates works on compute-only schedules; {schedule.name!r} is "
                         "already lowered")
    tasks = list(schedule.tasks)
    out: list[Task] = []
    waiting: list[Task] = []  # updates held back until the next backward run ends
    for i, t in enumerate(tasks):
        nxt = tasks[i + 1] if i + 1 < len(tasks) else None
        prev = tasks[i - 1] if i else None
        if t.op is Op.UPD and prev is not None and prev.op is Op.BWD and prev.pack == t.pack \
                and nxt is not None and nxt.op is Op.BWD:
            waiting.append(t)
            continue
        out.append(t)
        run_ends = t.op is Op.BWD and (nxt is None or nxt.op is not Op.BWD or nxt.pack != t.pack)
        if run_ends and waiting and waiting[0].pack != t.pack:
            out += waiting
            waiting = []
    out += waiting
    return Schedule(schedule.name, schedule.packs, schedule.micro_batches, tuple(out),
                    schedule.recompute)


def add_allreduce(schedule: Schedule) -> Schedule:
    """Add ``&G p`` after pack p's last backward to a lowered schedule, and move a write-back
    of G p (``-G p``) that follows at once behind the next compute run (or just before U p,
    if that comes first; before the first update when every update follows the last
    backward, as clipping needs), so the all-reduce overlaps that run.

    >>> from schedules.generators import harmony
    >>> from schedules.lower import lower
    >>> from schedules.placement import Placement
    >>> from schedules.task import Loc
    >>> s = add_allreduce(lower(lag_updates(harmony(2, 1)), Placement.uniform(2, Loc.DEVICE)))
    >>> str(s)
    '+X0.0 F0.0 B1.0 &G1 !X1.0 B0.0 &G0 !X0.0 !D1.0 U1 !G1 U0 !G0'
    """
    if not schedule.lowered:
        raise ValueError("add_allreduce works on lowered schedules (see schedules.lower)")
    tasks = list(schedule.tasks)
    last_bwd = {t.pack: i for i, t in enumerate(tasks) if t.op is Op.BWD}
    # Updates all after the last backward (global-norm clipping reads every G at the first):
    # the first update needs every write-back.
    last = max(last_bwd.values(), default=-1)
    deferred = all(i > last for i, t in enumerate(tasks) if t.op is Op.UPD)
    out: list[Task] = []
    # pack -> its held-back -G task and the pack of the compute run after it (None: not yet)
    held: dict[int, tuple[Task, int | None]] = {}
    for i, t in enumerate(tasks):
        if t.op.is_compute:
            for p, (move, other) in list(held.items()):
                if (t.op is Op.UPD and (t.pack == p or deferred)) \
                        or (other is not None and t.pack != other):
                    out.append(move)  # that run is over (or the update needs G p now)
                    del held[p]
                elif other is None and t.pack != p and t.op is not Op.UPD:
                    held[p] = (move, t.pack)
        if t.op is Op.SWAP_OUT and t.kind is Kind.G and _just_reduced(out, t.pack):
            held[t.pack] = (t, None)
            continue
        out.append(t)
        if t.op is Op.BWD and i == last_bwd[t.pack]:
            out.append(Task(Op.ALLREDUCE, t.pack, kind=Kind.G))
    out += [move for move, _ in held.values()]
    return schedule.with_tasks(out, schedule.placement, schedule.prefetch)


def _just_reduced(out: list[Task], p: int) -> bool:
    """Whether G p's all-reduce was issued after the last compute task so far."""
    for t in reversed(out):
        if t.op is Op.ALLREDUCE and t.pack == p:
            return True
        if t.op.is_compute:
            return False
    return False


# -- the sharded optimizer --------------------------------------------------------------------
REDUCE_LINK = "reduce"
BROADCAST_LINK = "broadcast"


def owners(k_bytes: list[int] | tuple[int, ...], ranks: int) -> tuple[int, ...]:
    """The rank that owns each pack's optimizer state, balancing the state's bytes: packs in
    order of decreasing bytes (ties: the lower pack) each go to the rank holding the fewest
    bytes so far (ties: the lower rank). Deterministic, so every rank computes the same.

    >>> owners([4, 1, 3, 2], 2)
    (0, 0, 1, 1)
    """
    if ranks < 1:
        raise ValueError(f"ranks={ranks} must be >= 1")
    load = [0] * ranks
    out = [0] * len(k_bytes)
    for p in sorted(range(len(k_bytes)), key=lambda p: (-k_bytes[p], p)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        out[p] = r
        load[r] += k_bytes[p]
    return tuple(out)


def add_reduce_broadcast(schedule: Schedule) -> Schedule:
    """The sharded-optimizer form of :func:`add_allreduce`: each pack's gradient is summed onto
    the rank owning its optimizer (``^G p``, where ``&G p`` would be), only that rank steps it,
    and the new weights go from the owner to every rank (``*W p``, right after ``U p``). Every
    rank runs the same tasks (on a rank that does not own pack p, ``U p`` steps nothing); the
    next use of W p waits for its broadcast (the simulator counts it within the step).

    >>> from schedules.generators import harmony
    >>> from schedules.lower import lower
    >>> from schedules.placement import Placement
    >>> from schedules.task import Loc
    >>> s = lower(lag_updates(harmony(2, 1)), Placement.uniform(2, Loc.DEVICE))
    >>> str(add_reduce_broadcast(s))
    '+X0.0 F0.0 B1.0 ^G1 !X1.0 B0.0 ^G0 !X0.0 !D1.0 U1 *W1 !G1 U0 *W0 !G0'
    """
    out: list[Task] = []
    for t in add_allreduce(schedule).tasks:
        if t.op is Op.ALLREDUCE:
            out.append(Task(Op.REDUCE, t.pack, kind=t.kind))
            continue
        out.append(t)
        if t.op is Op.UPD:
            out.append(Task(Op.BROADCAST, t.pack, kind=Kind.W))
    return schedule.with_tasks(out, schedule.placement, schedule.prefetch)
