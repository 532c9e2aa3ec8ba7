"""The swap engine: starts copies between tiers and counts them.

Every copy goes through :meth:`SwapEngine.copy`, which starts it asynchronously on the link's
stream (or worker thread), counts its bytes per link and kind, and times it. Whoever needs the
destination calls :meth:`SwapEngine.wait` on the returned handle; the time compute waits there
is the link's stall time (on CPU the host's time blocked; on CUDA the time the compute stream
waited, from events). On CUDA, busy and stall times are resolved as their events are reached:
:meth:`SwapEngine.settle` reports those already reached, and :meth:`SwapEngine.close` all.

Under the deferred copier (``HARMONY_COPIER=deferred``, :mod:`swap.deferred`) the engine also
carries the copier's :class:`swap.ledger.Ledger`: :meth:`SwapEngine.watch` makes tiers check
their buffers against it, and :meth:`SwapEngine.host_write` / :meth:`SwapEngine.host_read` let
the runtime check the bytes the host itself is about to touch. Otherwise those are no-ops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from swap.handle import Handle, ThenHandle
from swap.ledger import Ledger
from swap.stats import Stats
from swap.streams import Accounts, make_copier
from swap.tier import Tier


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
        # checking mode (the deferred copier): what each copy touches
        self.ledger: Ledger | None = getattr(self._copier, "ledger", None)

    def watch(self, tiers: Iterable[Tier], device: Tier | None = None) -> None:
        """In checking mode, make ``tiers`` (``device``: the one holding device memory) check
        their buffers' lifetimes against the copies and poison pooled buffers; otherwise
        nothing. Idempotent.

        >>> e = SwapEngine(torch.device("cpu"), Stats())
        >>> host, dev = Tier("host", torch.device("cpu")), Tier("device", torch.device("cpu"))
        >>> e.watch([host, dev], device=dev)   # (checks only under HARMONY_COPIER=deferred)
        >>> e.close()
        """
        if self.ledger is None:
            return
        for tier in tiers:
            tier.watch(self.ledger, device_memory=tier is device)

    def host_write(self, t: torch.Tensor, what: str) -> None:
        """The host is about to write ``t`` (a file read into it, an optimizer step): in
        checking mode raise :class:`swap.ledger.BufferLifetimeError` if a copy touching it
        may still run; otherwise nothing."""
        if self.ledger is not None:
            self.ledger.host_write(t, what)

    def host_read(self, t: torch.Tensor, what: str) -> None:
        """The host is about to read ``t`` (a file written from it): in checking mode raise
        if a copy writing it may still run; otherwise nothing."""
        if self.ledger is not None:
            self.ledger.host_read(t, what)

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

        return ThenHandle(worker.submit(run), first, self.device)

    def count(self, link: str, kind: str, nbytes: int, seconds: float = 0.0) -> None:
        """Count bytes moved by a path outside this engine (e.g. the NVMe store)."""
        self.stats.count(link, kind, nbytes)
        if seconds:
            self.stats.busy(link, seconds)

    def wait(self, handle: Handle, link: str) -> None:
        """Make compute wait for ``handle``; the time compute waited counts as ``link``'s stall
        (on CUDA measured with events on the compute stream, resolved lazily).

        Raises:
            ValueError: ``handle`` runs on another device than this engine's (its stream
                would never be waited for by this device's compute).
        """
        device = getattr(handle, "device", None)
        if device is not None and not _same_device(device, self.device):
            raise ValueError(f"a handle of {device} waited for on {link} by the engine of "
                             f"{self.device}: compute on {self.device} cannot wait for another "
                             "device's copy; issue the copy through this device's engine")
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

    def synchronize_all(self) -> None:
        """A device synchronization: wait for the follow-up threads' queued work and for
        every copy issued so far (on CUDA ``torch.cuda.synchronize``); raises the error of a
        copy that nothing raised yet. The runtime ends each step with it."""
        with self._lock:
            followers = list(self._followers.values())
        for worker in followers:
            worker.submit(lambda: None).result()
        self._copier.synchronize()

    def close(self) -> None:
        with self._lock:
            followers = list(self._followers.values())
            self._followers.clear()
        for worker in followers:
            worker.shutdown(wait=True)
        self._copier.close()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` may be one device (``cuda`` without an index matches any)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
