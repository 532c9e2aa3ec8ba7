"""Copy streams: the one module where CUDA and CPU differ.

On CUDA each link gets its own copy stream. A copy first waits for the work already issued on
the issuing thread's compute stream (which may still be writing its source, or reading the
buffer it overwrites), or on a mark of that stream taken earlier (:meth:`CudaCopier.mark`, for
a copy started later by another thread), then runs on the copy stream; its handle's ``wait``
makes the current stream of the copy's device wait on the copy's event, so the host thread
never blocks for device-side dependencies.

Time on CUDA is measured with events, never with the host's clock around an asynchronous call:
a copy's busy time is the time between its start and end events on the copy stream, and a
stall is the time the compute stream spent waiting for a copy (an event recorded before the
wait and one after it). Both are resolved lazily, when their events are reached: when a handle
is polled or synchronized, when later copies are issued, at :meth:`CudaCopier.settle` and at
:meth:`CudaCopier.close`; every one is counted exactly once.

On CPU each link gets one worker thread (a FIFO queue, like a stream). ``Tensor.copy_`` releases
the GIL, so copies overlap with compute on the main thread. The worker owns nothing: the caller
keeps source and destination alive until the handle is done (the tiers' ``release(after=...)``
does exactly that).

``HARMONY_COPIER=deferred`` replaces both by :class:`swap.deferred.DeferredCopier`, a checking
mode that gives the CPU CUDA's semantics (copies run late; ``wait`` tells the host nothing).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from swap.deferred import DeferredCopier
from swap.handle import DoneHandle, FutureHandle, Handle, timed


class Accounts(Protocol):
    """Where a CUDA copier charges the device temporaries it makes (a :class:`swap.tier.Tier`)."""

    def charge(self, nbytes: int, what: str = ...) -> None: ...

    def uncharge(self, nbytes: int, after: Handle | None = None) -> None: ...

COPIERS = ("default", "deferred")  # HARMONY_COPIER's values (unset: the default)


class ThreadCopier:
    """Copies on one worker thread per link (``device``: the one its handles belong to)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()  # guards the worker table (copies come from any thread)

    def _worker(self, link: str, prefix: str) -> ThreadPoolExecutor:
        with self._lock:
            worker = self._workers.get(link)
            if worker is None:
                worker = self._workers[link] = ThreadPoolExecutor(
                    1, thread_name_prefix=f"{prefix} {link}")
            return worker

    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str,
             on_done: Callable[[float], None], ready: object = None) -> Handle:
        """Start ``dst.copy_(src)`` on ``link``'s worker; ``ready`` is unused on CPU (the
        issuing thread's work is done by the time it issues)."""
        def run() -> None:
            dst.copy_(src)

        return FutureHandle(self._worker(link, "copy").submit(timed(run, on_done)), self.device)

    def submit(self, link: str, fn: Callable[[], None], on_done: Callable[[float], None]) -> Handle:
        """Run ``fn`` on ``link``'s worker, in order with the link's copies."""
        return FutureHandle(self._worker(link, "io").submit(timed(fn, on_done)))

    def mark(self) -> None:
        """Nothing to mark on CPU: work issued on the host thread is done when issued."""
        return None

    def synchronize(self) -> None:
        """Wait for every copy queued so far (each link's worker runs its queue in order)."""
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.submit(lambda: None).result()

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.shutdown(wait=True)


class _EventTiming:
    """The time between two CUDA events, reported once to ``on_done`` (seconds) when the later
    event has been reached. Thread-safe: whichever thread sees it first reports it."""

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event,
                 on_done: Callable[[float], None]) -> None:
        self.start, self.end, self._on_done = start, end, on_done
        self._lock = threading.Lock()
        self._reported = False

    def resolve(self, block: bool = False) -> bool:
        """Report the time if the end event was reached (with ``block``, wait for it first);
        returns whether the time has been reported (by this call or an earlier one)."""
        with self._lock:
            if self._reported:
                return True
            if block:
                self.end.synchronize()
            elif not self.end.query():
                return False
            self._reported = True
            seconds = self.start.elapsed_time(self.end) / 1000.0
        self._on_done(seconds)
        return True


class CudaHandle:
    """A copy on a CUDA stream of ``device``, finished when its end event is reached.

    ``wait`` makes the calling thread's current stream *of the copy's device* wait on the
    end event (never the current device's, which may be another GPU); ``synchronize`` blocks
    the host until the copy is done.
    """

    def __init__(self, device: torch.device, timing: _EventTiming) -> None:
        self.device: torch.device | None = device
        self._timing = timing

    @property
    def event(self) -> torch.cuda.Event:
        """The event recorded after the copy on its copy stream."""
        return self._timing.end

    def done(self) -> bool:
        finished = bool(self._timing.end.query())
        if finished:
            self._timing.resolve()
        return finished

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._timing.end)

    def synchronize(self) -> None:
        self._timing.resolve(block=True)


class CudaCopier:
    """Copies on one CUDA stream per link, all on ``device`` (``cuda`` alone: the current one).

    ``tier``, if given, is charged for a temporary the copier makes on the device (a
    contiguous copy of a non-contiguous source) until the copy reading it is done.

    Example (on a GPU)::

        copier = CudaCopier(torch.device("cuda", 0))
        h = copier.copy(on_gpu, pinned_host, "host->device", print)
        h.wait()          # later kernels on this thread's stream run after the copy
        copier.close()    # prints the copy's seconds (if nothing polled it earlier)
    """

    def __init__(self, device: torch.device, tier: Accounts | None = None) -> None:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.tier = tier
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._lock = threading.Lock()  # guards the stream table and the pending timings
        self._timings: deque[_EventTiming] = deque()

    def _stream(self, link: str) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(link)
            if stream is None:
                stream = self._streams[link] = torch.cuda.Stream(self.device)
            return stream

    def mark(self) -> torch.cuda.Event:
        """An event recorded now on the calling thread's current stream of the device: a copy
        given it as ``ready`` waits for exactly the work issued before this call, even when
        another thread issues the copy later (the second hop of an NVMe-staged transfer)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str,
             on_done: Callable[[float], None], ready: Any = None) -> Handle:
        """Start ``dst.copy_(src)`` on ``link``'s stream.

        The copy waits for ``ready`` (a :meth:`mark`) if given, else for the work issued so far
        on the calling thread's current stream. A non-contiguous device source is first made
        contiguous on that compute stream (charged to ``tier`` until the copy is done);
        a non-contiguous device destination is refused.

        Raises:
            ValueError: a non-contiguous destination on the device.
        """
        if dst.is_cuda and not dst.is_contiguous():
            raise ValueError(f"copy on {link}: the device destination {tuple(dst.shape)} with "
                             f"strides {dst.stride()} is not contiguous; copy into a contiguous "
                             "buffer (the copy stream would make an uncharged temporary)")
        compute = torch.cuda.current_stream(self.device)
        stream = self._stream(link)
        temp = 0
        if src.is_cuda and not src.is_contiguous():
            # Made on the compute stream, after src's producer, and charged; copy_ would
            # otherwise make it on the copy stream's pool, unseen by any budget.
            temp = src.numel() * src.element_size()
            if self.tier is not None:
                self.tier.charge(temp, f"a contiguous copy of a {tuple(src.shape)} source")
            if ready is not None:
                compute.wait_event(ready)  # (an earlier point of the producing stream)
            src = src.contiguous()
            ready = torch.cuda.Event()
            ready.record(compute)
        if ready is not None:
            stream.wait_event(ready)
        else:
            # Wait for compute that may still produce src or read dst's previous contents.
            stream.wait_stream(compute)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
        # The caching allocator must not hand these blocks to the compute stream before the copy.
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(stream)
        timing = _EventTiming(start, end, on_done)
        handle = CudaHandle(self.device, timing)
        self._track(timing)
        if temp and self.tier is not None:
            self.tier.uncharge(temp, after=handle)
        return handle

    def measure_wait(self, handle: Handle, on_stall: Callable[[float], None]) -> None:
        """``handle.wait()``, with the time the compute stream then waits for it reported to
        ``on_stall`` (seconds, resolved lazily) from events on either side of the wait."""
        compute = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        handle.wait()
        after.record(compute)
        self._track(_EventTiming(before, after, on_stall))

    def _track(self, timing: _EventTiming) -> None:
        with self._lock:
            self._timings.append(timing)
        self.settle()

    def settle(self, block: bool = False) -> None:
        """Report the times of every copy and stall whose events were reached (with
        ``block``, of all of them, waiting for the device)."""
        while True:
            with self._lock:
                if not self._timings:
                    return
                timing = self._timings[0]
            if not timing.resolve(block):
                return
            with self._lock:
                if self._timings and self._timings[0] is timing:
                    self._timings.popleft()

    def submit(self, link: str, fn: Callable[[], None], on_done: Callable[[float], None]) -> Handle:
        t0 = time.perf_counter()
        fn()
        on_done(time.perf_counter() - t0)
        return DoneHandle()

    def synchronize(self) -> None:
        """Block until every stream of the device is idle (raises a pending CUDA error)."""
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self.settle(block=True)
        with self._lock:
            self._streams.clear()


def make_copier(device: torch.device, tier: Accounts | None = None
                ) -> ThreadCopier | CudaCopier | DeferredCopier:
    """The copier for a compute device: CUDA streams for ``cuda``, threads otherwise (the
    default), or with ``HARMONY_COPIER=deferred`` CUDA's semantics on CPU, a checking mode
    (:mod:`swap.deferred`). ``tier`` is charged for the device temporaries a CUDA copier
    makes (see :class:`CudaCopier`).

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
        return CudaCopier(device, tier)
    return ThreadCopier(device)


def host_pinning(device: torch.device) -> bool:
    """Whether host buffers should be page-locked: only when copies go to a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available()
