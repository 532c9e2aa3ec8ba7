"""What the runtime calls of the parallel layers, as small protocols (the runtime imports
nothing from :mod:`harmony.parallel`): a data-parallel rank's collectives
(:class:`DataParallelHooks`, implemented by :class:`harmony.parallel.data_parallel.DataParallel`)
and what a pipeline rank's SEND/RECV may do to the step (:class:`Exchange`, which the runtime
implements and hands to :attr:`RuntimeOptions.comm <harmony.runtime.options.RuntimeOptions>`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from harmony.runtime.slot import Value
from schedules.task import Ref, Task
from swap.engine import SwapEngine
from swap.handle import Handle
from swap.stats import Stats


class RankGroup(Protocol):
    """A process group as the runtime sees it: this process's rank."""

    @property
    def rank(self) -> int: ...


class DataParallelHooks(Protocol):
    """One data-parallel rank's collectives, as the runtime calls them during a step (see
    :class:`harmony.parallel.data_parallel.DataParallel` for what each does)."""

    @property
    def group(self) -> RankGroup: ...

    @property
    def broadcasts(self) -> dict[int, Any]:
        """Pack -> its weights' broadcast in flight (sharded optimizer)."""
        ...

    def start(self, p: int, flat: torch.Tensor, entries: list[Any], stats: Stats) -> None: ...

    def start_reduce(self, p: int, owner: int, flat: torch.Tensor, entries: list[Any],
                     stats: Stats) -> None: ...

    def wait(self, p: int) -> None: ...

    def start_broadcast(self, p: int, owner: int, buf: torch.Tensor, engine: SwapEngine,
                        done: Callable[[Handle | None], None] | None = None) -> None: ...

    def finish_broadcast(self, p: int) -> None: ...

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor: ...

    def all_sum(self, value: float) -> float: ...

    def abandon(self) -> None: ...


def weights_arrived(dp: DataParallelHooks | None, p: int) -> None:
    """Sharded optimizer: wait until pack ``p``'s weights of the last update are in the home
    copy (the broadcast of another rank's update, or this rank's own send before its update
    overwrites them). A no-op otherwise."""
    if dp is not None and p in dp.broadcasts:
        dp.finish_broadcast(p)


class Exchange(Protocol):
    """What a pipeline rank's SEND or RECV may do to the step being run."""

    @property
    def device(self) -> torch.device:
        """The compute device (received tensors go there)."""
        ...

    @property
    def loss(self) -> torch.Tensor:
        """The batch's loss so far (a float64 scalar on the device)."""
        ...

    def set_loss(self, loss: torch.Tensor) -> None:
        """Replace the loss so far (a later stage's, received with a gradient)."""

    def read(self, ref: Ref) -> tuple[Value, bool]:
        """Value ``ref`` on the device, and whether it is one tensor (not a tuple)."""
        ...

    def produce(self, ref: Ref, value: Value, single: bool) -> None:
        """Make ``value`` (received) the device copy of ``ref``."""

    def count(self, link: str, kind: str, nbytes: int) -> None:
        """Count bytes moved on ``link`` (as ``trainer.stats.bytes_moved`` shows them)."""


Comm = Callable[[Task, Exchange], None]  # a pipeline rank's SEND or RECV of a task
