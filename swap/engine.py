"""The swap engine: starts copies between tiers and counts them.

Every copy goes through :meth:`SwapEngine.copy`, which starts it asynchronously on the link's
stream (or worker thread), counts its bytes per link and kind, and times it. Whoever needs the
destination calls :meth:`SwapEngine.wait` on the returned handle; the time compute waits there
is the link's stall time (on CPU the host's time blocked; on CUDA the time the compute stream
waited, from events). On CUDA, busy and stall times are resolved as their events are reached:
:meth:`SwapEngine.settle` reports those already reached, and :meth:`SwapEngine.close` all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from swap.handle import Handle, ThenHandle
from swap.stats import Stats
from swap.streams import Accounts, make_copier


class SwapEngine:
    """Asynchronous copies between tiers, with bytes and time per link in ``stats``.

    Args:
        device: the compute device (chooses CUDA streams or worker threads).
        stats: where bytes, busy and stall time are counted.
        device_tier: charged for the temporaries a CUDA copy makes on the device (a
            contiguous copy of a non-contiguous source); None: not charged.

    >>> e = SwapEngine(torch.device("cpu"), Stats())
    >>> dst = torch.empty(4); h = e.copy(dst, torch.ones(4), "host->device", "W")
    >>> e.wait(h, "host->device"); e.stats.bytes_moved["host->device"]
    16
    >>> e.close()
    """

    def __init__(self, device: torch.device, stats: Stats,
                 device_tier: Accounts | None = None) -> None:
        self.device, self.stats = device, stats
        self._copier = make_copier(device, device_tier)
        self._followers: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()  # guards the follower table (any thread may chain work)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str, kind: str,
             ready: object = None) -> Handle:
        """Start ``dst.copy_(src)`` on ``link``; the caller keeps both alive until it is done.

        ``ready``: a :meth:`mark` taken earlier; the copy then waits for the compute issued
        before that mark (instead of the compute issued so far by the calling thread), as a
        follow-up thread's copy must (see :meth:`after`)."""
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"copy on {link}: {tuple(src.shape)} {src.dtype} into "
                             f"{tuple(dst.shape)} {dst.dtype}")
        nbytes = src.numel() * src.element_size()
        self.stats.count(link, kind, nbytes)

        def busy(s: float) -> None:
            self.stats.busy(link, s)

        if ready is None:
            return self._copier.copy(dst, src, link, busy)
        return self._copier.copy(dst, src, link, busy, ready=ready)

    def mark(self) -> object:
        """A mark of the compute issued so far by the calling thread (on CUDA an event on its
        current stream; None on CPU), for a copy that another thread starts later."""
        mark = getattr(self._copier, "mark", None)
        return None if mark is None else mark()

    def after(self, first: Handle, then: Callable[[], Handle], link: str) -> Handle:
        """Start ``then()`` once ``first`` is done, without blocking the caller.

        A follow-up thread for ``link`` (FIFO, like a stream) blocks on ``first`` and then calls
        ``then``, which starts the next piece of work (a copy on a CUDA stream, a file write)
        and returns its handle. The handle returned here is done when that work is; an error
        of ``first`` or ``then`` is raised by its ``wait``/``synchronize`` (``then`` does not
        run after ``first`` failed). Used for two-hop transfers such as NVMe -> pinned host
        staging -> GPU, so that the host thread keeps issuing compute meanwhile.
        """
        with self._lock:
            worker = self._followers.get(link)
            if worker is None:
                worker = self._followers[link] = ThreadPoolExecutor(
                    1, thread_name_prefix=f"after {link}")

        def run() -> Handle:
            first.synchronize()
            return then()

        return ThenHandle(worker.submit(run))

    def count(self, link: str, kind: str, nbytes: int, seconds: float = 0.0) -> None:
        """Count bytes moved by a path outside this engine (e.g. the NVMe store)."""
        self.stats.count(link, kind, nbytes)
        if seconds:
            self.stats.busy(link, seconds)

    def wait(self, handle: Handle, link: str) -> None:
        """Make compute wait for ``handle``; the time compute waited counts as ``link``'s stall
        (on CUDA measured with events on the compute stream, resolved lazily)."""
        if handle.done():
            handle.wait()
            return
        measure = getattr(self._copier, "measure_wait", None)
        if measure is not None:
            measure(handle, lambda s: self.stats.stall(link, s))
            return
        t0 = time.perf_counter()
        handle.wait()
        self.stats.stall(link, time.perf_counter() - t0)

    def synchronize(self, handle: Handle, link: str) -> None:
        """Block the host until ``handle`` is done (before the host itself reads the bytes)."""
        t0 = time.perf_counter()
        handle.synchronize()
        self.stats.stall(link, time.perf_counter() - t0)

    def settle(self) -> None:
        """Count the busy and stall times whose events were reached (CUDA; never blocks).
        Call it when reading the stats, e.g. at the end of a step."""
        settle = getattr(self._copier, "settle", None)
        if settle is not None:
            settle()

    def close(self) -> None:
        with self._lock:
            followers = list(self._followers.values())
            self._followers.clear()
        for worker in followers:
            worker.shutdown(wait=True)
        self._copier.close()
