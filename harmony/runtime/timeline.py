"""When each task of a step ran, for ``Trainer.record_step``: host time on CPU, GPU time on CUDA.

On CPU a task runs on the calling thread, so ``time.perf_counter`` around it is when it ran. On
CUDA the host only enqueues kernels: the host's times say when a task was issued, not when the
GPU ran it. :class:`EventClock` records an event on the compute stream at each mark instead
and reads the times once the step's final device synchronization has passed them (reading an
event earlier would block the host).

>>> clock = clock_for(torch.device("cpu"))
>>> begin = clock.mark(); end = clock.mark()
>>> clock.seconds(begin, end) >= 0.0
True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch


class Clock(Protocol):
    """Marks taken during a step, turned into seconds after it (see the module)."""

    def mark(self) -> Any:
        """A point in the step (taken on the issuing thread, in issue order)."""
        ...

    def seconds(self, begin: Any, mark: Any) -> float:
        """Seconds from ``begin`` to ``mark`` (only once the step's work has run)."""
        ...


class HostClock:
    """``time.perf_counter`` marks (CPU compute runs as it is issued)."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, begin: float, mark: float) -> float:
        return mark - begin


class EventClock:
    """Timing events recorded on the current (compute) stream.

    Args:
        event: makes an event with ``record()`` and ``elapsed_time(other)`` in milliseconds
            (default: ``torch.cuda.Event(enable_timing=True)``).
    """

    def __init__(self, event: Callable[[], Any] | None = None) -> None:
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))

    def mark(self) -> Any:
        event = self._event()
        event.record()
        return event

    def seconds(self, begin: Any, mark: Any) -> float:
        return float(begin.elapsed_time(mark)) / 1000.0


def clock_for(device: torch.device) -> HostClock | EventClock:
    """The clock that times tasks on ``device``: events on CUDA, the host's clock otherwise."""
    return EventClock() if device.type == "cuda" else HostClock()
