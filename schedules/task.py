"""Tasks: the steps of a schedule, with a compact text form that round-trips.

A task is an op on a pack, optionally for one micro-batch and, for data movement, one kind of
tensor. The text form is short enough to print whole schedules on a line::

    F2.0   forward of pack 2 over micro-batch 0
    F1.0-3 one forward of pack 1 over micro-batches 0 to 3 together (a forward group)
    B2.0   backward of pack 2 over micro-batch 0 (recomputing its forward first)
    U2     optimizer update of pack 2
    +W2    swap in:  copy pack 2's weights from their home to the device
    -G2    swap out: copy pack 2's gradients from the device to their home, free the device copy
    +X1.3  swap in the stashed input of pack 1 for micro-batch 3
    ~W2    free the device copy (the home copy is valid, so nothing is copied)
    !X1.3  the value is dead: release every copy of it
    &G2    start summing pack 2's gradients over the data-parallel ranks (an all-reduce)
    ^G2    start summing pack 2's gradients onto the rank that owns its optimizer (a reduce)
    *W2    start sending pack 2's updated weights from their owner to every rank (a broadcast)
    >X2.0  send pack 2's input for micro-batch 0 to the next rank (pipeline; D goes to the previous)
    <D2.0  receive the gradient of pack 2's input for micro-batch 0 from the next rank

>>> Task.parse("+X1.3")
Task(op=<Op.SWAP_IN: '+'>, pack=1, mb=3, kind=<Kind.X: 'X'>)
>>> str(Task(Op.BWD, 2, 0))
'B2.0'
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Op(enum.Enum):
    """What a task does. The value is the op's symbol in the text form."""

    FWD = "F"
    BWD = "B"
    UPD = "U"
    SWAP_IN = "+"
    SWAP_OUT = "-"
    FREE = "~"
    DEL = "!"
    ALLREDUCE = "&"  # sum a value over the data-parallel ranks (see schedules.data_parallel)
    REDUCE = "^"  # sum a value onto the rank owning the pack's optimizer (sharded optimizer)
    BROADCAST = "*"  # send a value from the rank owning the pack to every rank
    SEND = ">"
    RECV = "<"

    @property
    def is_compute(self) -> bool:
        return self in (Op.FWD, Op.BWD, Op.UPD)

    @property
    def is_comm(self) -> bool:
        """A transfer between neighbouring pipeline ranks: X flows to the next rank, D back."""
        return self in (Op.SEND, Op.RECV)


class Kind(enum.Enum):
    """The kinds of tensors a schedule moves.

    W weights (compute dtype), G gradients, K optimizer state, X a pack's input activation for one
    micro-batch (also its stash for backward), D the gradient of the loss with respect to X, S the
    autograd graph a forward kept for its backward (only when the schedule does not recompute).
    """

    W = "W"
    G = "G"
    K = "K"
    X = "X"
    D = "D"
    S = "S"

    @property
    def per_micro_batch(self) -> bool:
        return self in (Kind.X, Kind.D, Kind.S)


class Loc(enum.Enum):
    """Where bytes live: the device tier, (pinned) host memory, or NVMe files."""

    DEVICE = "device"
    HOST = "host"
    NVME = "nvme"


@dataclass(frozen=True, order=True)
class Ref:
    """One value a schedule tracks: a kind, a pack and (for per-micro-batch kinds) a micro-batch."""

    kind: Kind
    pack: int
    mb: int | None = None

    def __str__(self) -> str:
        return f"{self.kind.value}{self.pack}" + ("" if self.mb is None else f".{self.mb}")


_TEXT = re.compile(r"^(?P<op>[FBU+\-~!&^*<>])(?P<kind>[WGKXDS]?)(?P<pack>\d+)"
                   r"(?:\.(?P<mb>\d+)(?:-(?P<last>\d+))?)?$")


@dataclass(frozen=True)
class Task:
    """One step of a schedule on one rank.

    Args:
        op: what to do.
        pack: the pack it applies to.
        mb: the micro-batch (FWD, BWD, and moves of per-micro-batch kinds), else None.
        kind: the kind of tensor moved (SWAP_IN, SWAP_OUT, FREE, DEL, SEND, RECV), else None.
        last: a forward over a group of consecutive micro-batches ``mb..last`` (run as one
            call over their samples together), else None. Only FWD tasks group, and a group
            has at least two micro-batches (``F1.0-0`` is written ``F1.0``).

    >>> Task.parse("F1.0-3").mbs
    range(0, 4)
    """

    op: Op
    pack: int
    mb: int | None = None
    kind: Kind | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        if self.pack < 0 or (self.mb is not None and self.mb < 0):
            raise ValueError(f"task {self!r}: pack and micro-batch must be >= 0")
        if self.last is not None:
            if self.op is not Op.FWD or self.mb is None:
                raise ValueError(f"{self.op.name} of pack {self.pack}: only a forward runs over "
                                 f"a group of micro-batches (got last={self.last})")
            if self.last <= self.mb:
                raise ValueError(f"FWD of pack {self.pack}: a group of micro-batches "
                                 f"{self.mb}..{self.last} must end after it starts")
        if self.op.is_compute:
            if self.kind is not None:
                raise ValueError(f"compute task {self.op.name} takes no kind, got {self.kind}")
            if (self.op is Op.UPD) != (self.mb is None):
                need = "UPD takes no" if self.op is Op.UPD else "needs a"
                raise ValueError(f"{self.op.name} of pack {self.pack}: {need} micro-batch")
        else:
            if self.kind is None:
                raise ValueError(f"{self.op.name} of pack {self.pack} needs a kind")
            if self.kind.per_micro_batch != (self.mb is not None):
                need = "needs a" if self.kind.per_micro_batch else "takes no"
                raise ValueError(f"{self.op.name} {self.kind.value}{self.pack}: kind "
                                 f"{self.kind.value} {need} micro-batch")
            if self.op.is_comm and self.kind not in (Kind.X, Kind.D):
                raise ValueError(f"{self.op.name} {self.kind.value}{self.pack}: only activations "
                                 "(X) and their gradients (D) pass between ranks")

    @property
    def mbs(self) -> range:
        """The micro-batches the task covers: one, several for a forward group, none for an
        update or a move of a weight, gradient or optimizer state."""
        if self.mb is None:
            return range(0)
        return range(self.mb, (self.mb if self.last is None else self.last) + 1)

    @property
    def ref(self) -> Ref:
        """The value a data-movement task acts on."""
        if self.kind is None:
            raise ValueError(f"{self} is a compute task and moves no value")
        return Ref(self.kind, self.pack, self.mb)

    @staticmethod
    def move(op: Op, ref: Ref) -> Task:
        return Task(op, ref.pack, ref.mb, ref.kind)

    def __str__(self) -> str:
        kind = "" if self.kind is None else self.kind.value
        mb = "" if self.mb is None else f".{self.mb}"
        group = "" if self.last is None else f"-{self.last}"
        return f"{self.op.value}{kind}{self.pack}{mb}{group}"

    def __repr__(self) -> str:
        group = "" if self.last is None else f", last={self.last}"
        return (f"Task(op={self.op!r}, pack={self.pack}, mb={self.mb}, kind={self.kind!r}"
                f"{group})")

    @staticmethod
    def parse(text: str) -> Task:
        """Parse the text form (``str(task)``); raises ValueError naming the text."""
        m = _TEXT.match(text.strip())
        if m is None:
            raise ValueError(f"cannot parse task {text!r}: expected e.g. 'F2.0', 'F1.0-3', "
                             "'B1.3', 'U0', '+W2', '-X1.0', '~W2', '!D1.0', '>X2.0', '<D2.0'")
        mb = None if m["mb"] is None else int(m["mb"])
        last = None if m["last"] is None else int(m["last"])
        kind = Kind(m["kind"]) if m["kind"] else None
        try:
            return Task(Op(m["op"]), int(m["pack"]), mb, kind, last)
        except ValueError as err:
            raise ValueError(f"task {text!r}: {err}") from None
