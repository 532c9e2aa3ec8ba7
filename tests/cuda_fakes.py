"""A recording stand-in for ``torch.cuda``'s streams and events, for CPU tests of the CUDA paths.

:class:`FakeCuda` replaces ``torch.cuda.Stream``, ``Event``, ``current_stream``, ``stream``,
``synchronize``, ``current_device`` and ``set_device`` for one test (through ``monkeypatch``),
with PyTorch's semantics where they matter here: every host thread has its own current device
and its own current stream per device (a new thread starts on device 0's default stream), and
``torch.cuda.stream(s)`` makes ``s`` current on its device for the calling thread. Nothing runs
asynchronously: copies happen at once, and an event is "reached" unless the test says
otherwise (:attr:`FakeCuda.pending`). Every call is appended to :attr:`FakeCuda.log`, so a test
asserts *which* stream waited on *which* event, the thing a CPU run cannot observe.

:class:`DeviceTensor` is a CPU tensor that says it is on the GPU (``is_cuda``) and records
``record_stream`` and ``contiguous`` calls with the stream current at the time.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

_ids = itertools.count()


def _index(device: Any) -> int | None:
    if device is None:
        return None
    if isinstance(device, int):
        return device
    return torch.device(device).index


class FakeStream:
    """A stream on one device; ``name`` shows in the log."""

    def __init__(self, fake: FakeCuda, device: Any = None, name: str | None = None) -> None:
        index = _index(device)
        self.fake = fake
        self.index = fake.current_device() if index is None else index
        self.device = torch.device("cuda", self.index)
        self.name = name or f"stream{next(_ids)}@{self.index}"

    def wait_stream(self, other: FakeStream) -> None:
        self.fake.log.append(("wait_stream", self, other))

    def wait_event(self, event: FakeEvent) -> None:
        self.fake.log.append(("wait_event", self, event))

    def synchronize(self) -> None:
        self.fake.log.append(("stream.synchronize", self))

    def __repr__(self) -> str:
        return self.name


class FakeEvent:
    """An event; ``stream`` is where it was last recorded."""

    def __init__(self, fake: FakeCuda, enable_timing: bool = False) -> None:
        self.fake, self.enable_timing = fake, enable_timing
        self.stream: FakeStream | None = None
        self.name = f"event{next(_ids)}"

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream if stream is not None else self.fake.current_stream()
        self.fake.log.append(("record", self, self.stream))

    def query(self) -> bool:
        return self not in self.fake.pending

    def synchronize(self) -> None:
        self.fake.log.append(("event.synchronize", self))
        self.fake.pending.discard(self)

    def elapsed_time(self, end: FakeEvent) -> float:
        """Milliseconds between two reached events: what the test set in ``fake.elapsed_ms``."""
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("elapsed_time needs events created with enable_timing=True")
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time of an event that was not reached")
        self.fake.log.append(("elapsed_time", self, end))
        return self.fake.elapsed_ms

    def __repr__(self) -> str:
        return self.name


class FakeCuda:
    """``torch.cuda``'s stream and event API, recorded (see the module docstring)."""

    def __init__(self, devices: int = 2) -> None:
        self.devices = devices
        self.log: list[tuple[Any, ...]] = []
        self.pending: set[FakeEvent] = set()  # events not reached yet
        self.elapsed_ms = 1.0
        self.hold = False  # new events stay unreached until synchronize()
        self.streams_made: list[FakeStream] = []
        self._local = threading.local()
        self._default = [FakeStream(self, i, f"default@{i}") for i in range(devices)]

    # -- per-thread state, as CUDA keeps it --------------------------------------------------
    def _state(self) -> Any:
        if not hasattr(self._local, "device"):
            self._local.device = 0
            self._local.streams = {}
        return self._local

    def current_device(self) -> int:
        return int(self._state().device)

    def set_device(self, device: Any) -> None:
        index = _index(device)
        assert index is not None, "set_device needs an index"
        self.log.append(("set_device", index))
        self._state().device = index

    def current_stream(self, device: Any = None) -> FakeStream:
        index = _index(device)
        index = self.current_device() if index is None else index
        return self._state().streams.get(index, self._default[index])

    @contextlib.contextmanager
    def stream(self, s: FakeStream) -> Iterator[None]:
        state = self._state()
        before = state.streams.get(s.index)
        state.streams[s.index] = s
        try:
            yield
        finally:
            if before is None:
                del state.streams[s.index]
            else:
                state.streams[s.index] = before

    def synchronize(self, device: Any = None) -> None:
        self.log.append(("synchronize", device))
        self.pending.clear()

    def new_stream(self, device: Any = None, **_: Any) -> FakeStream:
        s = FakeStream(self, device)
        self.streams_made.append(s)
        return s

    def new_event(self, enable_timing: bool = False, **_: Any) -> FakeEvent:
        event = FakeEvent(self, enable_timing)
        if self.hold:
            self.pending.add(event)
        return event

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
        """Put the fake in place of ``torch.cuda``'s functions for the current test."""
        for name, value in [("Stream", self.new_stream), ("Event", self.new_event),
                            ("current_stream", self.current_stream), ("stream", self.stream),
                            ("synchronize", self.synchronize),
                            ("current_device", self.current_device),
                            ("set_device", self.set_device),
                            ("device_count", lambda: self.devices),
                            ("is_available", lambda: True)]:
            monkeypatch.setattr(torch.cuda, name, value)
        return self

    def calls(self, what: str) -> list[tuple[Any, ...]]:
        """The logged calls named ``what`` (e.g. ``"wait_event"``), in order."""
        return [c for c in self.log if c[0] == what]


class DeviceTensor(torch.Tensor):
    """A CPU tensor posing as a GPU tensor, for the copier's device-side checks."""

    fake: FakeCuda | None = None

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def record_stream(self, stream: Any) -> None:  # type: ignore[override]
        assert DeviceTensor.fake is not None
        DeviceTensor.fake.log.append(("record_stream", stream))

    def contiguous(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if DeviceTensor.fake is not None and not self.is_contiguous():
            DeviceTensor.fake.log.append(("contiguous", DeviceTensor.fake.current_stream()))
        return super().contiguous(*args, **kwargs)


def on_device(t: torch.Tensor, fake: FakeCuda) -> DeviceTensor:
    """``t`` posing as a GPU tensor whose calls go to ``fake``'s log."""
    DeviceTensor.fake = fake
    return t.as_subclass(DeviceTensor)  # type: ignore[return-value]
