"""Copy streams: the one module where CUDA and CPU differ.

On CUDA each link gets its own copy stream. A copy first waits for the work already issued on
the compute stream (which may still be writing its source, or reading the buffer it overwrites),
then runs on the copy stream; its handle's ``wait`` makes the compute stream wait on the copy's
event, so the host thread never blocks for device-side dependencies.

On CPU each link gets one worker thread (a FIFO queue, like a stream). ``Tensor.copy_`` releases
the GIL, so copies overlap with compute on the main thread. The worker owns nothing: the caller
keeps source and destination alive until the handle is done (the tiers' ``release(after=...)``
does exactly that).

``HARMONY_COPIER=deferred`` replaces both by :class:`swap.deferred.DeferredCopier`, a checking
mode that gives the CPU CUDA's semantics (copies run late; ``wait`` tells the host nothing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from swap.deferred import DeferredCopier
from swap.handle import FutureHandle, Handle, timed

COPIERS = ("default", "deferred")  # HARMONY_COPIER's values (unset: the default)


class ThreadCopier:
    """Copies on one worker thread per link (``device``: the one its handles belong to)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._workers: dict[str, ThreadPoolExecutor] = {}

    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str,
             on_done: Callable[[float], None]) -> Handle:
        worker = self._workers.get(link)
        if worker is None:
            worker = self._workers[link] = ThreadPoolExecutor(1, thread_name_prefix=f"copy {link}")
        def run() -> None:
            dst.copy_(src)

        return FutureHandle(worker.submit(timed(run, on_done)), self.device)

    def submit(self, link: str, fn: Callable[[], None], on_done: Callable[[float], None]) -> Handle:
        """Run ``fn`` on ``link``'s worker, in order with the link's copies."""
        worker = self._workers.get(link)
        if worker is None:
            worker = self._workers[link] = ThreadPoolExecutor(1, thread_name_prefix=f"io {link}")
        return FutureHandle(worker.submit(timed(fn, on_done)))

    def synchronize(self) -> None:
        """Wait for every copy queued so far (each link's worker runs its queue in order)."""
        for w in list(self._workers.values()):
            w.submit(lambda: None).result()

    def close(self) -> None:
        for w in self._workers.values():
            w.shutdown(wait=True)
        self._workers.clear()


class CudaHandle:
    """A copy on a CUDA stream, finished when its end event is reached."""

    device: torch.device | None = None

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event,
                 on_done: Callable[[float], None]) -> None:
        self._start, self._end, self._on_done, self._timed = start, end, on_done, False

    def done(self) -> bool:
        finished = bool(self._end.query())
        if finished:
            self._record()
        return finished

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._end)

    def synchronize(self) -> None:
        self._end.synchronize()
        self._record()

    def _record(self) -> None:
        if not self._timed:
            self._timed = True
            self._on_done(self._start.elapsed_time(self._end) / 1000.0)


class CudaCopier:
    """Copies on one CUDA stream per link."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._streams: dict[str, torch.cuda.Stream] = {}

    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str,
             on_done: Callable[[float], None]) -> Handle:
        stream = self._streams.get(link)
        if stream is None:
            stream = self._streams[link] = torch.cuda.Stream(self.device)
        # Wait for compute that may still produce src or read dst's previous contents.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
        # The caching allocator must not hand these blocks to the compute stream before the copy.
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(stream)
        return CudaHandle(start, end, on_done)

    def submit(self, link: str, fn: Callable[[], None], on_done: Callable[[float], None]) -> Handle:
        t0 = time.perf_counter()
        fn()
        on_done(time.perf_counter() - t0)
        from swap.handle import DoneHandle

        return DoneHandle()

    def synchronize(self) -> None:
        """Block until every stream of the device is idle (raises a pending CUDA error)."""
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._streams.clear()


def make_copier(device: torch.device) -> ThreadCopier | CudaCopier | DeferredCopier:
    """The copier for a compute device: CUDA streams for ``cuda``, threads otherwise (the
    default), or with ``HARMONY_COPIER=deferred`` CUDA's semantics on CPU, a checking mode
    (:mod:`swap.deferred`).

    Raises:
        ValueError: ``HARMONY_COPIER`` holds another value.
    """
    name = os.environ.get("HARMONY_COPIER", "")
    if name not in ("", *COPIERS):
        raise ValueError(f"HARMONY_COPIER={name!r} is not a copier; use one of "
                         f"{', '.join(COPIERS)}, or leave it unset")
    if name == "deferred":
        return DeferredCopier(device)
    if device.type == "cuda":
        return CudaCopier(device)
    return ThreadCopier(device)


def host_pinning(device: torch.device) -> bool:
    """Whether host buffers should be page-locked: only when copies go to a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available()
