"""Compute-only schedules: which pack runs which micro-batch when.

Three packs P0..P2, two micro-batches (F forward, B backward with recompute, U update)::

    harmony          F0.0 F0.1 F1.0 F1.1 | B2.0 B2.1 U2 | B1.0 B1.1 U1 | B0.0 B0.1 U0
    per-microbatch   F0.0 F1.0 B2.0 B1.0 B0.0 | F0.1 F1.1 B2.1 B1.1 B0.1 | U0 U1 U2
    resident         same order as per-microbatch, forwards keep their graph (no recompute)

``harmony`` is layer-major: a pack runs every micro-batch while its weights are on the device,
and its update runs just in time after its last backward, so weights cross the host link about
twice per step. ``per-microbatch`` is what a virtual-memory system does: each micro-batch walks
every pack, so weights cross once per micro-batch each way. The last pack never has a separate
forward: its backward runs the forward (and the loss) itself.

A forward may cover a group of micro-batches (``F1.0-3``: one call over their samples
together), which keeps a device busier than several small calls. Backward, stashes and updates
stay per micro-batch, so only a schedule that recomputes can group forwards, and only packs whose
layers treat samples independently and draw no random numbers (:mod:`harmony.planning.profile` finds
them) give the same result. Forwards in groups of two, pack 1 per micro-batch::

    harmony(3, 4, group=2, grouped={0})
        F0.0-1 F0.2-3 F1.0 F1.1 F1.2 F1.3 | B2.0 B2.1 B2.2 B2.3 U2 | ...

Lowering (:mod:`schedules.lower`) later adds the swaps these orders imply.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from schedules.schedule import Schedule
from schedules.task import Op, Task


def harmony(packs: int, micro_batches: int, deferred_updates: bool = False, group: int = 1,
            grouped: Collection[int] | None = None) -> Schedule:
    """Layer-major forward, reverse layer-major backward, just-in-time updates.

    With ``deferred_updates`` every update waits until the last backward (what global-norm
    gradient clipping needs: the norm covers every pack's gradients), so each pack's gradients
    wait at the update's tier until then::

        F0.0 F0.1 F1.0 F1.1 | B2.0 B2.1 | B1.0 B1.1 | B0.0 B0.1 | U2 U1 U0

    ``group``: micro-batches per forward task (the last group may be shorter) in the packs
    ``grouped`` (None: every pack); the other packs run a forward per micro-batch.
    """
    _check(packs, micro_batches)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group={group!r} must be a positive int (micro-batches per forward)")
    tasks = [t for p in range(packs - 1)
             for t in forwards(p, micro_batches, group if grouped is None or p in grouped else 1)]
    for p in reversed(range(packs)):
        tasks += [Task(Op.BWD, p, m) for m in range(micro_batches)]
        if not deferred_updates:
            tasks.append(Task(Op.UPD, p))
    if deferred_updates:
        tasks += [Task(Op.UPD, p) for p in reversed(range(packs))]
    return Schedule("harmony", packs, micro_batches, tuple(tasks), recompute=True)


def forwards(pack: int, micro_batches: int, group: int) -> list[Task]:
    """The forward tasks of ``pack`` over ``micro_batches``, ``group`` micro-batches each
    (the last group may be shorter; a group of one is a plain ``F p.m``).

    >>> " ".join(map(str, forwards(1, 5, 2)))
    'F1.0-1 F1.2-3 F1.4'
    """
    out = []
    for first in range(0, micro_batches, group):
        last = min(first + group, micro_batches) - 1
        out.append(Task(Op.FWD, pack, first, last=last if last > first else None))
    return out


def _micro_batch_major(name: str, packs: int, micro_batches: int, recompute: bool) -> Schedule:
    _check(packs, micro_batches)
    tasks: list[Task] = []
    for m in range(micro_batches):
        tasks += [Task(Op.FWD, p, m) for p in range(packs - 1)]
        tasks += [Task(Op.BWD, p, m) for p in reversed(range(packs))]
    tasks += [Task(Op.UPD, p) for p in range(packs)]
    return Schedule(name, packs, micro_batches, tuple(tasks), recompute=recompute)


def per_microbatch(packs: int, micro_batches: int) -> Schedule:
    """Each micro-batch walks all packs forward then backward; updates at the end."""
    return _micro_batch_major("per-microbatch", packs, micro_batches, recompute=True)


def resident(packs: int, micro_batches: int) -> Schedule:
    """Plain gradient accumulation: no recompute, forwards keep their graph until backward."""
    return _micro_batch_major("resident", packs, micro_batches, recompute=False)


GENERATORS: dict[str, Callable[..., Schedule]] = {
    "harmony": harmony,
    "per-microbatch": per_microbatch,
    "resident": resident,
}


def generate(name: str, packs: int, micro_batches: int,
             deferred_updates: bool = False, group: int = 1,
             grouped: Collection[int] | None = None) -> Schedule:
    """The compute-only schedule called ``name``; raises ValueError listing the known names.

    ``deferred_updates``: every update after the last backward (the micro-batch-major
    schedules update at the end anyway). ``group``, ``grouped``: forward groups (see
    :func:`harmony`), which only ``harmony`` has: ``per-microbatch`` walks one micro-batch
    through every pack at a time, and ``resident`` keeps each micro-batch's autograd graph.
    """
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(GENERATORS)}") from None
    if name == "harmony":
        return gen(packs, micro_batches, deferred_updates, group, grouped)
    if group != 1:
        raise ValueError(f"schedule {name!r} runs a forward per micro-batch (group={group!r}); "
                         "forward groups need schedule='harmony', whose backward recomputes "
                         "each micro-batch from its stashed input")
    return gen(packs, micro_batches)


def _check(packs: int, micro_batches: int) -> None:
    if packs < 1:
        raise ValueError(f"a schedule needs at least one pack, got packs={packs}")
    if micro_batches < 1:
        raise ValueError(f"a schedule needs at least one micro-batch, got {micro_batches}")
