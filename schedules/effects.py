"""What each compute task reads and produces: the one definition lowering, validation,
simulation and the runtime share.

For a schedule with P packs (the last pack, P-1, runs its forward inside its backward):

    FWD p m   reads W p, X p.m on the device; produces X p+1.m (and S p.m without recompute)
    FWD p m-l a forward group: reads W p and X p.m .. X p.l; produces X p+1.m .. X p+1.l
              (only with recompute: a forward without it keeps a graph per micro-batch)
    BWD p m   reads W p, X p.m, D p+1.m (p < P-1), S p.m (no recompute, p < P-1) and G p
              (from the second backward of p in the step on); produces D p.m (p > 0) and G p
    UPD p     reads G p where the update runs (the device if K p lives there, else the host);
              rewrites W p at home (a device copy becomes stale). With K on NVMe, W p's master
              and K p are read into host memory from the pack's first backward on, and written
              back after the update (see the simulator).
    SEND X/D  reads the value on the device (a pipeline rank passes it to its neighbour)
    RECV X/D  produces the value on the device
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schedules.placement import Placement
from schedules.task import Kind, Loc, Op, Ref, Task


@dataclass(frozen=True)
class Effect:
    """A compute (or SEND/RECV) task's reads (value, where it must be) and the values it
    creates on the device."""

    reads: tuple[tuple[Ref, Loc], ...]
    produces: tuple[Ref, ...]
    updates: tuple[Ref, ...] = ()  # values modified in place on the device (G accumulation)


def effect(task: Task, packs: int, recompute: bool, placement: Placement,
           has_grad: bool) -> Effect:
    """The effect of compute ``task``; ``has_grad`` says whether G of its pack already exists."""
    p, m, dev = task.pack, task.mb, Loc.DEVICE
    if task.op is Op.FWD:
        if p >= packs - 1:
            raise ValueError(f"{task}: the last pack's forward is fused into its backward")
        if task.last is not None and not recompute:
            raise ValueError(f"{task}: a forward group needs a schedule that recomputes in "
                             "backward (without recompute each micro-batch keeps its own graph)")
        produces = [Ref(Kind.X, p + 1, i) for i in task.mbs]
        if not recompute:
            produces.append(Ref(Kind.S, p, m))
        inputs = tuple((Ref(Kind.X, p, i), dev) for i in task.mbs)
        return Effect(((Ref(Kind.W, p), dev), *inputs), tuple(produces))
    if task.op is Op.BWD:
        reads = [(Ref(Kind.W, p), dev), (Ref(Kind.X, p, m), dev)]
        if p < packs - 1:
            reads.append((Ref(Kind.D, p + 1, m), dev))
            if not recompute:
                reads.append((Ref(Kind.S, p, m), dev))
        made: list[Ref] = [Ref(Kind.D, p, m)] if p > 0 else []
        if has_grad:
            reads.append((Ref(Kind.G, p), dev))
            return Effect(tuple(reads), tuple(made), (Ref(Kind.G, p),))
        return Effect(tuple(reads), (*made, Ref(Kind.G, p)))
    if task.op is Op.UPD:
        return Effect(((Ref(Kind.G, p), placement.update_loc(p)),), ())
    if task.op is Op.SEND:
        return Effect(((task.ref, dev),), ())
    if task.op is Op.RECV:
        return Effect((), (task.ref,))
    raise ValueError(f"{task} is not a compute task")


def is_transient(ref: Ref) -> bool:
    """Values that die within a step (everything but weights and optimizer state)."""
    return ref.kind not in (Kind.W, Kind.K)


def updates_after_backward(tasks: Sequence[Task]) -> set[int]:
    """Packs whose update is the next compute task after their last backward.

    Their update inputs on NVMe (master weights, optimizer state) are read while their backward
    runs; for the others (updates deferred, e.g. for gradient clipping) they are read just
    before the update, so host memory holds them for one update, not for many backwards.
    """
    compute = [t for t in tasks if t.op.is_compute]
    out = set()
    for i, t in enumerate(compute):
        if t.op is Op.UPD and i > 0 and compute[i - 1].op is Op.BWD \
                and compute[i - 1].pack == t.pack:
            out.add(t.pack)
    return out
