"""Pipelined harmony: contiguous stages of packs on ranks, passing activations by SEND/RECV.

Each rank runs its own packs layer-major (every micro-batch of a pack while its weights are on
the device, updates just in time), with pack numbers kept global. The first pack of a stage
receives its input X from the previous rank one micro-batch at a time and sends the gradient D
back; the last pack of a stage sends its output to the next rank as soon as each micro-batch's
forward produced it, so the next stage starts while this one goes on. Four packs on two ranks,
two micro-batches (``>`` send, ``<`` receive)::

    rank 0  F0.0 F0.1 F1.0 >X2.0 F1.1 >X2.1 <D2.0 B1.0 <D2.1 B1.1 U1 B0.0 B0.1 U0
    rank 1  <X2.0 F2.0 <X2.1 F2.1 B3.0 B3.1 U3 B2.0 >D2.0 B2.1 >D2.1 U2

A send is asynchronous and a receive waits, so on a clock where every compute task takes one
tick (:func:`clock`) the ranks line up like this::

    rank 0  F0.0 F0.1 F1.0 F1.1    .    .    .    .    . B1.0 B1.1   U1 B0.0 B0.1   U0
    rank 1     .    .    . F2.0 F2.1 B3.0 B3.1   U3 B2.0 B2.1   U2    .    .    .    .

(:func:`bubble`: 40% of these ticks idle; the share falls as packs per stage and
micro-batches grow.)

The bubble: a stage waits for the upstream forward of every pack but the upstream stage's last
(all micro-batches) plus one micro-batch of that last pack, and the upstream stage waits for the
downstream forward and backward of one micro-batch less than all of it. Layer-major order makes
the bubble larger than GPipe's (which overlaps micro-batch by micro-batch) in exchange for
moving each pack's weights about twice per step on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from schedules.schedule import Schedule
from schedules.task import Kind, Op, Ref, Task
from schedules.validate import ScheduleError, validate

# Assumed bytes/s between two ranks until measured (PCIe 3 x16 peer to peer).
RANK_BANDWIDTH = 1.2e10


def peer(rank: int, task: Task) -> int:
    """The rank a SEND goes to or a RECV comes from: X flows forward, D backward.

    >>> peer(0, Task.parse(">X2.0")), peer(1, Task.parse(">D2.0"))
    (1, 0)
    """
    if not task.op.is_comm:
        raise ValueError(f"{task} is not a SEND or RECV")
    forward = (task.kind is Kind.X) == (task.op is Op.SEND)
    return rank + 1 if forward else rank - 1


def peer_link(rank: int, task: Task) -> str:
    """The link a SEND/RECV on ``rank`` uses, named source first: ``"rank0->rank1"``."""
    other = peer(rank, task)
    src, dst = (rank, other) if task.op is Op.SEND else (other, rank)
    return f"rank{src}->rank{dst}"


def check_stages(stages: Sequence[tuple[int, int]], total: int, ranks: int,
                 unit: str = "packs", name: str = "stages") -> tuple[tuple[int, int], ...]:
    """Return ``stages`` as a tuple after checking they are ``ranks`` contiguous, non-empty
    ``[start, stop)`` ranges covering ``0..total``; raises ValueError naming the bad value.

    >>> check_stages([(0, 2), (2, 5)], 5, 2)
    ((0, 2), (2, 5))
    """
    try:
        out = tuple((int(a), int(b)) for a, b in stages)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={stages!r} must be a list of (start, stop) {unit} ranges, one "
                         "per rank, e.g. [(0, 4), (4, 8)]") from None
    if ranks > total:
        raise ValueError(f"{ranks} ranks but only {total} {unit}: every rank needs at least one; "
                         f"run with at most {total} ranks or split the model finer")
    if len(out) != ranks:
        raise ValueError(f"{name}={list(out)} has {len(out)} stages but there are {ranks} ranks; "
                         "give one (start, stop) range per rank")
    expect = 0
    for r, (a, b) in enumerate(out):
        if a != expect or b <= a:
            raise ValueError(f"{name}={list(out)}: stage {r} is {a}..{b} but must start at "
                             f"{expect} and be non-empty; stages must cover {unit} 0..{total} in "
                             "order without gaps or overlaps")
        expect = b
    if expect != total:
        raise ValueError(f"{name}={list(out)} ends at {expect} but the chain has {total} {unit}; "
                         f"the last stage must stop at {total}")
    return out


def balance(costs: Sequence[float], ranks: int) -> tuple[tuple[int, int], ...]:
    """Split items with these ``costs`` into ``ranks`` contiguous stages minimising the largest
    stage's cost (ties: the earliest cut). Raises ValueError with more ranks than items.

    >>> balance([1, 1, 1, 3], 2)
    ((0, 3), (3, 4))
    """
    n = len(costs)
    if ranks < 1 or ranks > n:
        raise ValueError(f"{ranks} ranks for {n} packs: every rank needs at least one pack; "
                         f"run with 1..{n} ranks, or use more packs (a smaller device budget "
                         "or explicit stages)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest-stage cost of items 0..i-1 on k stages; cut: last cut
    best = [[inf] * (n + 1) for _ in range(ranks + 1)]
    cut = [[0] * (n + 1) for _ in range(ranks + 1)]
    best[0][0] = 0.0
    for k in range(1, ranks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], n
    for k in range(ranks, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return tuple(reversed(bounds))


def stage_schedule(packs: int, micro_batches: int, stages: Sequence[tuple[int, int]],
                   rank: int) -> Schedule:
    """The compute and SEND/RECV tasks of ``rank`` (compute-only otherwise: lower it next).

    Args:
        packs: packs of the whole chain. micro_batches: per step.
        stages: ``[first, stop)`` packs of every rank, contiguous (see :func:`check_stages`).
        rank: which rank's schedule.

    >>> str(stage_schedule(3, 1, [(0, 1), (1, 3)], 0))
    'F0.0 >X1.0 <D1.0 B0.0 U0'
    """
    stages = check_stages(stages, packs, len(stages))
    if not 0 <= rank < len(stages):
        raise ValueError(f"rank={rank} is not one of the {len(stages)} stages' ranks")
    if micro_batches < 1:
        raise ValueError(f"a schedule needs at least one micro-batch, got {micro_batches}")
    a, b = stages[rank]
    M, last = micro_batches, packs - 1

    def recv_x(p: int, m: int) -> list[Task]:
        return [Task(Op.RECV, a, m, Kind.X)] if p == a and a > 0 else []

    tasks: list[Task] = []
    for p in range(a, min(b, last)):
        for m in range(M):
            tasks += recv_x(p, m)
            tasks.append(Task(Op.FWD, p, m))
            if p == b - 1:  # b <= last here: the output goes to the next rank
                tasks.append(Task(Op.SEND, b, m, Kind.X))
    for p in reversed(range(a, b)):
        for m in range(M):
            if p == last:  # the loss pack runs its forward inside its backward
                tasks += recv_x(p, m)
            if p == b - 1 and b < packs:
                tasks.append(Task(Op.RECV, b, m, Kind.D))
            tasks.append(Task(Op.BWD, p, m))
            if p == a and a > 0:
                tasks.append(Task(Op.SEND, a, m, Kind.D))
        tasks.append(Task(Op.UPD, p))
    return Schedule("pipeline", packs, micro_batches, tuple(tasks), recompute=True,
                    stage=(a, b), rank=rank)


def pipeline(packs: int, micro_batches: int,
             stages: Sequence[tuple[int, int]]) -> list[Schedule]:
    """Every rank's schedule (see :func:`stage_schedule`).

    >>> [str(s) for s in pipeline(2, 1, [(0, 1), (1, 2)])]
    ['F0.0 >X1.0 <D1.0 B0.0 U0', '<X1.0 B1.0 >D1.0 U1']
    """
    return [stage_schedule(packs, micro_batches, stages, r) for r in range(len(stages))]


def clock(schedules: Sequence[Schedule]) -> list[list[tuple[int, Task]]]:
    """When each rank's compute tasks run if each takes one tick, sends cost nothing and a
    receive waits for its send: per rank, (tick, task). Raises :class:`ScheduleError` (the
    stuck receive marked) when the ranks deadlock.
    """
    at = [0] * len(schedules)
    pos = [0] * len(schedules)
    sent: dict[tuple[int, Ref], int] = {}  # (receiving rank, value) -> tick it was sent
    out: list[list[tuple[int, Task]]] = [[] for _ in schedules]
    progress = True
    while progress:
        progress = False
        for r, s in enumerate(schedules):
            while pos[r] < len(s.tasks):
                t = s.tasks[pos[r]]
                if t.op is Op.RECV:
                    if (r, t.ref) not in sent:
                        break
                    at[r] = max(at[r], sent[(r, t.ref)])
                elif t.op is Op.SEND:
                    sent[(peer(r, t), t.ref)] = at[r]
                elif t.op.is_compute:
                    out[r].append((at[r], t))
                    at[r] += 1
                pos[r] += 1
                progress = True
    for r, s in enumerate(schedules):
        if pos[r] < len(s.tasks):
            raise ScheduleError(f"rank {r} waits forever: no rank sends what it receives here",
                                s, pos[r])
    return out


def format_clock(schedules: Sequence[Schedule]) -> str:
    """The ranks' compute tasks on the :func:`clock`, one line per rank, ``.`` for idle ticks."""
    ticks = clock(schedules)
    end = max((k + 1 for row in ticks for k, _ in row), default=0)
    cells = [["."] * end for _ in schedules]
    for r, row in enumerate(ticks):
        for k, t in row:
            cells[r][k] = str(t)
    w = max([len(c) for row in cells for c in row] + [1])
    return "\n".join(f"rank {r}  " + " ".join(f"{c:>{w}}" for c in row).rstrip()
                     for r, row in enumerate(cells)) + "\n"


def bubble(schedules: Sequence[Schedule]) -> float:
    """The idle share of the ranks' ticks on the :func:`clock` (0: no bubble)."""
    ticks = clock(schedules)
    end = max((k + 1 for row in ticks for k, _ in row), default=0)
    busy = sum(len(row) for row in ticks)
    return 1.0 - busy / (end * len(schedules)) if end else 0.0


def validate_pipeline(schedules: Sequence[Schedule]) -> None:
    """Raise :class:`ScheduleError` unless the ranks' schedules run together.

    Checks, in order: the stages are contiguous and cover every pack; every value a rank sends
    is received by its peer in the same order (point-to-point messages between two ranks
    arrive in order), the unmatched task marked in that rank's grid; each rank's schedule on its
    own (:func:`schedules.validate.validate`); and that no rank waits forever.

    >>> validate_pipeline(pipeline(4, 2, [(0, 2), (2, 4)]))
    """
    if not schedules:
        raise ValueError("validate_pipeline needs at least one rank's schedule")
    first = schedules[0]
    stages = []
    for r, s in enumerate(schedules):
        if s.rank != r or s.packs != first.packs or s.micro_batches != first.micro_batches:
            raise ScheduleError(f"schedule {r} is for rank {s.rank} with {s.packs} packs x "
                                f"{s.micro_batches} micro-batches; expected rank {r} with "
                                f"{first.packs} x {first.micro_batches}", s, None)
        stages.append(s.stage if s.stage is not None else (0, s.packs))
    check_stages(stages, first.packs, len(schedules))
    for r in range(len(schedules) - 1):
        for kind, src, dst in ((Kind.X, r, r + 1), (Kind.D, r + 1, r)):
            sends = [(i, t) for i, t in enumerate(schedules[src].tasks)
                     if t.op is Op.SEND and t.kind is kind]
            recvs = [(i, t) for i, t in enumerate(schedules[dst].tasks)
                     if t.op is Op.RECV and t.kind is kind]
            for k in range(max(len(sends), len(recvs))):
                s_ref = sends[k][1].ref if k < len(sends) else None
                r_ref = recvs[k][1].ref if k < len(recvs) else None
                if s_ref == r_ref:
                    continue
                if s_ref is not None:
                    got = f"receives {r_ref} there" if r_ref is not None else "receives nothing"
                    raise ScheduleError(
                        f"rank {src} sends {s_ref} to rank {dst} as message {k} of that link, "
                        f"but rank {dst} {got}", schedules[src], sends[k][0])
                raise ScheduleError(
                    f"rank {dst} receives {r_ref} from rank {src}, which never sends it "
                    f"(message {k} of that link)", schedules[dst], recvs[k][0])
    for s in schedules:
        validate(s)
    clock(schedules)
