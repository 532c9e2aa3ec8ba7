"""Lowering: add the swaps a placement implies to a compute-only schedule.

Walking the compute tasks in order, every value a task needs on the device and not there gets a
SWAP_IN, and every value on the device whose home is elsewhere leaves after its use unless it is
needed again soon:

* weights and gradients are loaded ``prefetch`` runs before the run that needs them (a run is a
  stretch of consecutive tasks on one pack), so the copy hides behind that run's compute;
* activations (X, D) are loaded one task ahead (or just before use when ``prefetch`` is 0);
* after a use, a value stays on the device when its next load would be issued right away anyway;
  otherwise it is written behind (SWAP_OUT, when its home holds no valid copy) or dropped (FREE);
* a value's last use is followed by DEL, which releases every copy of it;
* an update whose optimizer state is off the device first receives its gradients (SWAP_OUT of G).

Harmony, 3 packs, 2 micro-batches, everything at home on the host, prefetch 1::

    +W0 +X0.0 +X0.1 +W1 F0.0 ~X0.0 F0.1 ~W0 ~X0.1 +W2 F1.0 -X1.0 F1.1 -X1.1 B2.0 ...
"""

from __future__ import annotations

from collections import defaultdict

from schedules.effects import effect, is_transient
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Kind, Loc, Op, Ref, Task


def lower(schedule: Schedule, placement: Placement, prefetch: int = 1) -> Schedule:
    """Return ``schedule`` with SWAP_IN / SWAP_OUT / FREE / DEL tasks for ``placement``.

    Args:
        schedule: a compute-only schedule (from :mod:`schedules.generators`).
        placement: the home tier of each pack's values; must have ``schedule.packs`` packs.
        prefetch: how many runs ahead weights are loaded (0: just before use).

    Raises:
        ValueError: the schedule already has data moves, or the placement does not match.
    """
    if placement.packs != schedule.packs:
        raise ValueError(f"placement has {placement.packs} packs, schedule has {schedule.packs}")
    if prefetch < 0:
        raise ValueError(f"prefetch={prefetch} must be >= 0")
    # Compute tasks, and a pipeline rank's SEND/RECV, which read and produce values like them.
    compute = list(schedule.tasks)
    if any(not (t.op.is_compute or t.op.is_comm) for t in compute):
        raise ValueError(f"schedule {schedule.name!r} is already lowered")
    n, packs = len(compute), schedule.packs

    run: list[int] = []
    run_start: list[int] = []
    prev: int | None = None  # the pack of the last compute task: a SEND/RECV starts no run
    for i, t in enumerate(compute):
        if i == 0 or (t.op.is_compute and prev is not None and t.pack != prev):
            run_start.append(i)
        if t.op.is_compute:
            prev = t.pack
        run.append(len(run_start) - 1)

    effects = []
    grads: set[int] = set()
    for t in compute:
        effects.append(effect(t, packs, schedule.recompute, placement, t.pack in grads))
        if t.op is Op.BWD:
            grads.add(t.pack)
        elif t.op is Op.UPD:
            grads.discard(t.pack)

    uses: dict[Ref, list[tuple[int, Loc]]] = defaultdict(list)
    last: dict[Ref, int] = {}
    for i, e in enumerate(effects):
        for ref, loc in e.reads:
            uses[ref].append((i, loc))
            last[ref] = i
        for ref in e.produces:
            last.setdefault(ref, i)

    def next_use(ref: Ref, i: int) -> tuple[int, Loc] | None:
        return next(((j, loc) for j, loc in uses[ref] if j > i), None)

    def home(ref: Ref) -> Loc:
        return placement.home(ref.kind, ref.pack)

    def load_at(ref: Ref, i: int) -> int:
        """Where the prefetch for a use at compute task i goes (before that task)."""
        if ref.kind in (Kind.W, Kind.G, Kind.K):
            return run_start[max(run[i] - prefetch, 0)]
        return i - 1 if prefetch > 0 else i

    before: list[list[Task]] = [[] for _ in range(n)]
    after: list[list[Task]] = [[] for _ in range(n)]
    on_device: set[Ref] = set()
    home_valid: set[Ref] = {Ref(Kind.X, 0, m) for m in range(schedule.micro_batches)}
    for p in range(packs):
        for kind in (Kind.W, Kind.K):
            home_valid.add(Ref(kind, p))
    evicted_after: dict[Ref, int] = {}

    def evict(ref: Ref, slot: list[Task], i: int) -> None:
        if ref in home_valid:
            slot.append(Task.move(Op.FREE, ref))
        else:
            slot.append(Task.move(Op.SWAP_OUT, ref))
            home_valid.add(ref)
        on_device.discard(ref)
        evicted_after[ref] = i

    for i, (t, e) in enumerate(zip(compute, effects)):
        if t.op is Op.UPD and placement.k[t.pack] is not Loc.DEVICE:
            w = Ref(Kind.W, t.pack)
            if w in on_device:  # the update rewrites W at home: the device copy goes stale
                evict(w, after[i - 1] if i else before[i], i - 1)
        for ref, loc in e.reads:
            if home(ref) is Loc.DEVICE:
                continue
            if loc is Loc.DEVICE and ref not in on_device:
                if ref not in home_valid:
                    raise AssertionError(f"lowering: {ref} is needed by {t} but exists nowhere")
                pos = min(max(load_at(ref, i), evicted_after.get(ref, -1) + 1, 0), i)
                before[pos].append(Task.move(Op.SWAP_IN, ref))
                on_device.add(ref)
            elif loc is not Loc.DEVICE and ref in on_device:
                evict(ref, before[i], i - 1)
        for ref in e.produces:
            if home(ref) is not Loc.DEVICE:
                on_device.add(ref)
            home_valid.discard(ref)
        for ref in e.updates:
            home_valid.discard(ref)

        touched = [ref for ref, _ in e.reads] + list(e.produces)
        for ref in touched:
            if is_transient(ref) and last[ref] == i:
                after[i].append(Task.move(Op.DEL, ref))
                on_device.discard(ref)
                home_valid.discard(ref)
                continue
            if ref not in on_device:
                continue
            nxt = next_use(ref, i)
            # Keep a value whose reload would be issued right after its eviction anyway.
            if nxt is not None and nxt[1] is Loc.DEVICE and load_at(ref, nxt[0]) <= i + 1:
                continue
            evict(ref, after[i], i)

    tasks: list[Task] = []
    for i, t in enumerate(compute):
        tasks += before[i]
        tasks.append(t)
        tasks += after[i]
    return schedule.with_tasks(tasks, placement, prefetch)
