"""What belongs to one step, made fresh by each :meth:`harmony.runtime.runtime.Runtime.run`
(:class:`StepState`), and what a pipeline rank's SEND/RECV sees of it (:class:`StepExchange`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from harmony.runtime.batch import Batch
from harmony.runtime.options import StepData
from harmony.runtime.slot import Value
from harmony.runtime.values import Values
from schedules.effects import updates_after_backward
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.simulate import Sizes
from schedules.task import Ref, Task
from swap.engine import SwapEngine


@dataclass
class StepState:
    """One step being run.

    ``loss``: the batch's mean loss so far, on the device until a check needs it (once per
    step, before the first update: reading it per micro-batch would block the host each time).
    ``grads``: packs whose gradients this step created and their update has not read;
    ``forwarded``: (pack, micro-batch) forwards run; ``updated``: packs whose update ran;
    ``stage_early``: packs whose update directly follows their last backward (an NVMe pack's
    update inputs are then read behind that backward); ``record``: where each task's timing
    goes (``Trainer.record_step``; None: not recorded), from ``marks`` taken on the device's
    clock (task, start, end, bytes each tier held after it).
    """

    schedule: Schedule
    sizes: Sizes
    data: StepData
    step: int
    mb_offset: int
    batch: Batch
    loss: torch.Tensor
    record: list[dict[str, object]] | None = None
    grads: set[int] = field(default_factory=set)
    forwarded: set[tuple[int, int]] = field(default_factory=set)
    updated: list[int] = field(default_factory=list)
    stage_early: set[int] = field(default_factory=set)
    marks: list[tuple[Task, Any, Any, dict[str, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stage_early = updates_after_backward(self.schedule.tasks)

    @property
    def placement(self) -> Placement:
        """The step's placement (a lowered schedule has one)."""
        assert self.schedule.placement is not None
        return self.schedule.placement


class StepExchange:
    """The step as a pipeline rank's SEND or RECV sees it (implements
    :class:`harmony.runtime.hooks.Exchange`).

    Args:
        step: the step. values: its values. engine: counts the bytes moved.
        device: the compute device.
    """

    def __init__(self, step: StepState, values: Values, engine: SwapEngine,
                 device: torch.device) -> None:
        self._step, self._values, self._engine, self._device = step, values, engine, device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def loss(self) -> torch.Tensor:
        return self._step.loss

    def set_loss(self, loss: torch.Tensor) -> None:
        self._step.loss = loss

    def read(self, ref: Ref) -> tuple[Value, bool]:
        value = self._values.read(ref)
        return value, self._values.slot(ref).single

    def produce(self, ref: Ref, value: Value, single: bool) -> None:
        self._values.produce(ref, value, single)

    def count(self, link: str, kind: str, nbytes: int) -> None:
        self._engine.count(link, kind, nbytes)
