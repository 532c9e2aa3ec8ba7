"""Handles on asynchronous copies.

A :class:`Handle` stands for one copy (or one I/O request) that was started but may not be
finished. Whoever needs the destination bytes calls :meth:`Handle.wait` (the compute side may
proceed once the data is there) or :meth:`Handle.synchronize` (the host thread itself must see
the bytes, e.g. before a CPU optimizer step). On CPU both block; on CUDA ``wait`` only makes the
current stream wait on an event, so the host thread keeps issuing work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol


class Handle(Protocol):
    """What every asynchronous copy returns."""

    def done(self) -> bool:
        """True once the copy has finished (never blocks)."""
        ...

    def wait(self) -> None:
        """Make the compute side wait for the copy (on CPU: block until it is done)."""
        ...

    def synchronize(self) -> None:
        """Block the calling host thread until the copy is done; re-raises its error."""
        ...


class DoneHandle:
    """A handle for work that finished synchronously (or for no work at all)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


class FutureHandle:
    """A handle on work run by a thread pool; ``wait`` and ``synchronize`` both block."""

    def __init__(self, future: Future[Any]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.result()

    def synchronize(self) -> None:
        self._future.result()


class ThenHandle:
    """Work that a follow-up thread started once an earlier handle was done.

    ``future`` runs on the follow-up thread: it waits for the earlier handle, starts the next
    piece of work and returns that work's own handle. ``wait`` blocks the host only until the
    work has been started (then makes compute wait for it as that handle does: on CUDA, on its
    event), so a consumer can never wait on an event that was not recorded yet.
    """

    def __init__(self, future: Future[Handle]) -> None:
        self._future = future

    def done(self) -> bool:
        if not self._future.done():
            return False
        return self._future.exception() is not None or self._future.result().done()

    def wait(self) -> None:
        self._future.result().wait()

    def synchronize(self) -> None:
        self._future.result().synchronize()


class GroupHandle:
    """Several handles that complete together (e.g. the tensors of one tuple activation)."""

    def __init__(self, handles: list[Handle]) -> None:
        self._handles = handles

    def done(self) -> bool:
        return all(h.done() for h in self._handles)

    def wait(self) -> None:
        for h in self._handles:
            h.wait()

    def synchronize(self) -> None:
        for h in self._handles:
            h.synchronize()


def timed(fn: Callable[[], None], on_done: Callable[[float], None]) -> Callable[[], None]:
    """Wrap ``fn`` so that ``on_done(seconds)`` receives its duration (used for busy time)."""

    def run() -> None:
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            on_done(time.perf_counter() - t0)

    return run
