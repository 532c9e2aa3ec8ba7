"""The validator: checks that a (lowered) schedule can run, and shows where it cannot.

It replays the schedule on a model of where every value is (device copy, home copy) and checks
each task's preconditions: compute reads what is on the device, a swap-in has a valid home copy,
a FREE never drops the only valid copy, nothing is produced twice, every forward, backward and
update runs exactly once and each update after its pack's last backward, and at the end nothing
transient is alive and nothing with a home elsewhere is left on the device. A forward group
(``F1.0-3``) counts as the forward of each of its micro-batches.

A pipeline rank's schedule (``schedule.stage`` set) runs only its packs; it receives its first
pack's inputs (X) from the previous rank and sends their gradients (D) back, and sends its last
pack's outputs to the next rank and receives their gradients: each of those exactly once per
micro-batch, a send only of a value on the device, a receive only of one that does not exist.
Whether the ranks' sends and receives match is :func:`schedules.pipeline.validate_pipeline`'s
business.

On failure it raises :class:`ScheduleError` whose message ends with the grid, the bad task
marked ``>like this<``.
"""

from __future__ import annotations

from schedules.effects import effect, is_transient
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Kind, Loc, Op, Ref, Task


class ScheduleError(ValueError):
    """A schedule that cannot run; ``index`` is the position of the first bad task."""

    def __init__(self, message: str, schedule: Schedule, index: int | None) -> None:
        self.index = index
        where = "" if index is None else f" at task {index} ({schedule.tasks[index]})"
        super().__init__(f"schedule {schedule.name!r}{where}: {message}\n"
                         + schedule.grid(mark=index))


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` runs as written.

    A compute-only schedule (no placement) is checked for order and completeness only.

    >>> from schedules.generators import harmony
    >>> validate(harmony(3, 2))
    """
    P, M = schedule.packs, schedule.micro_batches
    lowered = schedule.placement is not None
    placement = schedule.placement or Placement.uniform(P, Loc.DEVICE)

    def home(ref: Ref) -> Loc:
        return placement.home(ref.kind, ref.pack) if lowered else Loc.DEVICE

    local = schedule.local_packs
    first, stop = local.start, local.stop
    exists: set[Ref] = {Ref(Kind.X, 0, m) for m in range(M)} if first == 0 else set()
    exists |= {Ref(k, p) for p in local for k in (Kind.W, Kind.K)}
    # The values this rank passes to (or takes from) its neighbours: op -> refs, once each.
    boundary = {Op.RECV: {Ref(Kind.X, first, m) for m in range(M) if first > 0}
                | {Ref(Kind.D, stop, m) for m in range(M) if stop < P},
                Op.SEND: {Ref(Kind.D, first, m) for m in range(M) if first > 0}
                | {Ref(Kind.X, stop, m) for m in range(M) if stop < P}}
    passed: dict[Op, set[Ref]] = {Op.RECV: set(), Op.SEND: set()}
    on_device = {r for r in exists if home(r) is Loc.DEVICE}
    home_valid = set(exists)
    done: set[Task] = set()
    forwarded: set[tuple[int, int]] = set()  # (pack, micro-batch): forward groups count each
    grads: set[int] = set()
    bwd_left = {p: M for p in range(P)}

    def fail(msg: str, i: int | None) -> None:
        raise ScheduleError(msg, schedule, i)

    for i, t in enumerate(schedule.tasks):
        if t.pack >= P or (t.mb is not None and t.mbs[-1] >= M):
            fail(f"refers to pack/micro-batch outside {P} packs x {M} micro-batches", i)
        if t.op.is_comm:
            ref = t.ref
            if ref not in boundary[t.op]:
                fail(f"{ref} does not cross this rank's stage boundary (packs {first}..{stop - 1}"
                     f" of {P}); a rank sends X{stop}/D{first} and receives X{first}/D{stop}", i)
            if ref in passed[t.op]:
                fail(f"{'sends' if t.op is Op.SEND else 'receives'} {ref} twice", i)
            passed[t.op].add(ref)
            if t.op is Op.RECV:
                if ref in exists:
                    fail(f"receives {ref}, which already exists", i)
                exists.add(ref)
                on_device.add(ref)
                home_valid.discard(ref)
            else:
                if ref not in exists:
                    fail(f"sends {ref}, which does not exist yet (or was deleted)", i)
                if ref not in on_device:
                    fail(f"sends {ref}, which is not on the device: add +{ref} before it", i)
            continue
        if t.op.is_compute:
            if t.pack not in local:
                fail(f"pack {t.pack} is not on this rank's stage (packs {first}..{stop - 1})", i)
            if t.op is Op.FWD:
                if twice := [m for m in t.mbs if (t.pack, m) in forwarded]:
                    fail(f"runs the forward of micro-batch {twice[0]} twice", i)
                forwarded.update((t.pack, m) for m in t.mbs)
            elif t in done:
                fail("runs twice", i)
            done.add(t)
            if t.op is Op.UPD and bwd_left[t.pack]:
                fail(f"update before the pack's last backward ({bwd_left[t.pack]} left)", i)
            try:
                e = effect(t, P, schedule.recompute, placement, t.pack in grads)
            except ValueError as err:
                fail(str(err), i)
            for ref, loc in e.reads:
                if ref not in exists:
                    fail(f"needs {ref}, which does not exist yet (or was deleted)", i)
                if loc is Loc.DEVICE and ref not in on_device:
                    fail(f"needs {ref} on the device; its home is {home(ref).value}: "
                         f"add +{ref} before it", i)
                if loc is not Loc.DEVICE and home(ref) is not Loc.DEVICE:
                    if ref not in home_valid:
                        fail(f"needs {ref} at {loc.value}, which holds no valid copy", i)
                    if t.op is Op.UPD and Ref(Kind.W, t.pack) in on_device:
                        fail(f"updates W{t.pack} at home while a device copy would go stale", i)
            for ref in e.produces:
                if ref in exists:
                    fail(f"produces {ref}, which already exists", i)
                exists.add(ref)
                on_device.add(ref)
                home_valid.discard(ref)
            for ref in e.updates:
                home_valid.discard(ref)
            if t.op is Op.BWD:
                grads.add(t.pack)
                bwd_left[t.pack] -= 1
            elif t.op is Op.UPD:
                grads.discard(t.pack)
            continue
        if not lowered:
            fail("data moves need a placement (lower the schedule first)", i)
        ref = t.ref
        if ref not in exists:
            fail(f"{ref} does not exist", i)
        if t.op in (Op.ALLREDUCE, Op.REDUCE):  # summed in place where it is: on the device
            if ref not in on_device:
                fail(f"{ref} must be on the device to be reduced", i)
            continue
        if t.op is Op.BROADCAST:  # the owner's updated weights, into every rank's home copy
            if ref.kind is not Kind.W or Task(Op.UPD, ref.pack) not in done:
                fail(f"broadcasts {ref} before U{ref.pack} updated it", i)
            continue
        if t.op is Op.SWAP_IN:
            if home(ref) is Loc.DEVICE:
                fail(f"{ref} lives on the device; nothing to swap in", i)
            if ref in on_device:
                fail(f"{ref} is already on the device", i)
            if ref not in home_valid:
                fail(f"{ref} has no valid copy at {home(ref).value}", i)
            on_device.add(ref)
        elif t.op is Op.SWAP_OUT:
            if home(ref) is Loc.DEVICE or ref not in on_device:
                fail(f"{ref} is not a device copy of a value homed elsewhere", i)
            on_device.discard(ref)
            home_valid.add(ref)
        elif t.op is Op.FREE:
            if ref not in on_device or home(ref) is Loc.DEVICE:
                fail(f"{ref} has no device copy to free", i)
            if ref not in home_valid:
                fail(f"freeing {ref} would lose it: its home holds no valid copy (use -{ref})", i)
            on_device.discard(ref)
        elif t.op is Op.DEL:
            if not is_transient(ref):
                fail(f"{ref} is permanent and cannot be deleted", i)
            exists.discard(ref)
            on_device.discard(ref)
            home_valid.discard(ref)

    expected = {Task(Op.FWD, p, m) for p in local if p < P - 1 for m in range(M)}
    expected |= {Task(Op.BWD, p, m) for p in local for m in range(M)}
    expected |= {Task(Op.UPD, p) for p in local}
    expected |= {Task.move(op, ref) for op, refs in boundary.items() for ref in refs}
    done |= {Task.move(op, ref) for op, refs in passed.items() for ref in refs}
    done = {t for t in done if t.op is not Op.FWD} | {Task(Op.FWD, p, m) for p, m in forwarded}
    if missing := sorted(map(str, expected - done)):
        fail(f"never runs {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}", None)
    if lowered:
        stray = sorted(str(r) for r in on_device if home(r) is not Loc.DEVICE)
        if stray:
            fail(f"ends with device copies of {', '.join(stray)}", None)
    alive = sorted(str(r) for r in exists if is_transient(r))
    if lowered and alive:
        fail(f"ends with {', '.join(alive)} never deleted", None)
