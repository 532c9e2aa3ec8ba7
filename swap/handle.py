"""Handles on asynchronous copies.

A :class:`Handle` stands for one copy (or one I/O request) that was started but may not be
finished. Whoever needs the destination bytes calls :meth:`Handle.wait` (the compute side may
proceed once the data is there) or :meth:`Handle.synchronize` (the host thread itself must see
the bytes, e.g. before a CPU optimizer step). With the thread copier both block; on CUDA
``wait`` only makes the compute stream wait on the copy's event, so the host thread keeps
issuing work and learns nothing: only ``synchronize`` (or ``done()`` returning True) tells the
host that the copy has finished, and only then may the host read, overwrite or give back its
buffers. :mod:`swap.deferred` runs the CPU suite with exactly these semantics.

Every handle carries ``device``: the device whose streams the work runs on (None for host-only
work such as file I/O), so that no stream ever waits on another device's event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

import torch


class Handle(Protocol):
    """What every asynchronous copy returns.

    ``device``: the device whose streams run the work (None: host work, e.g. NVMe I/O).
    """

    device: torch.device | None

    def done(self) -> bool:
        """True once the copy has finished (never blocks)."""
        ...

    def wait(self) -> None:
        """Order later compute after the copy (thread copier: block until it is done; CUDA and
        the deferred copier: the host learns nothing)."""
        ...

    def synchronize(self) -> None:
        """Block the calling host thread until the copy is done; re-raises its error."""
        ...


class DoneHandle:
    """A handle for work that finished synchronously (or for no work at all)."""

    device: torch.device | None = None

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


class FutureHandle:
    """A handle on work run by a thread pool; ``wait`` and ``synchronize`` both block."""

    def __init__(self, future: Future[Any], device: torch.device | None = None) -> None:
        self._future, self.device = future, device

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.result()

    def synchronize(self) -> None:
        self._future.result()


class ThenHandle:
    """Work that a follow-up thread started once an earlier handle was done.

    ``future`` runs on the follow-up thread: it synchronizes ``first``, starts the next piece
    of work and returns that work's own handle. ``wait`` blocks the host only until the work has
    been started (then makes compute wait for it as that handle does: on CUDA, on its event),
    so a consumer can never wait on an event that was not recorded yet. Once done, ``first`` is
    done too (the follow-up thread synchronized it), which :meth:`parts` tells a buffer check.
    ``device``: the device of the engine that chained the work.
    """

    def __init__(self, future: Future[Handle], first: Handle | None = None,
                 device: torch.device | None = None) -> None:
        self._future, self._first, self.device = future, first, device

    def done(self) -> bool:
        if not self._future.done():
            return False
        return self._future.exception() is not None or self._future.result().done()

    def wait(self) -> None:
        self._future.result().wait()

    def synchronize(self) -> None:
        self._future.result().synchronize()

    def parts(self) -> list[Handle]:
        """The handles whose completion this one's implies: ``first``, and the follow-up's
        handle once it was started."""
        parts = [self._first] if self._first is not None else []
        if self._future.done() and self._future.exception() is None:
            parts.append(self._future.result())
        return parts


class GroupHandle:
    """Several handles that complete together (e.g. the tensors of one tuple activation)."""

    def __init__(self, handles: list[Handle]) -> None:
        self._handles = handles
        # (the first device any part runs on: a group's parts come from one engine)
        self.device = next((h.device for h in handles if getattr(h, "device", None) is not None),
                           None)

    def done(self) -> bool:
        return all(h.done() for h in self._handles)

    def wait(self) -> None:
        for h in self._handles:
            h.wait()

    def synchronize(self) -> None:
        for h in self._handles:
            h.synchronize()

    def parts(self) -> list[Handle]:
        """The handles of the group."""
        return list(self._handles)


def parts(handle: Handle) -> list[Handle]:
    """``handle`` and, recursively, every handle whose completion its completion implies
    (the members of a :class:`GroupHandle`, a :class:`ThenHandle`'s first and follow-up)."""
    out, todo = [], [handle]
    while todo:
        h = todo.pop()
        out.append(h)
        inner = getattr(h, "parts", None)
        if callable(inner):
            todo.extend(inner())
    return out


def timed(fn: Callable[[], None], on_done: Callable[[float], None]) -> Callable[[], None]:
    """Wrap ``fn`` so that ``on_done(seconds)`` receives its duration (used for busy time)."""

    def run() -> None:
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            on_done(time.perf_counter() - t0)

    return run
