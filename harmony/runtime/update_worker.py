"""Optimizer steps of packs homed off the device on a worker thread, behind the next pack's
backward.

The update of a pack whose weights and optimizer state live on the host (or on NVMe) reads
only that pack's gradients, master weights and state, and the backward of the next pack reads
none of them (``B0.0`` needs W0 and D1, not W1). With ``Trainer(overlap_updates=True)`` the
runtime hands such a step to one worker thread (torch's kernels and the file I/O release the
GIL) and goes on:

    main thread   B1.0  B1.1  U1: set G1 on the masters, submit | B0.0  B0.1  U0: join U1 ...
    worker                                                    step(pack 1) ...........

Everything that next touches the pack joins the step first (:meth:`UpdateWorker.join`): the
next update of any pack (one step in flight at a time, so updates stay in schedule order),
the deletion of the pack's gradients (deferred to the join), its next weight load or
broadcast, and the end of the step (so ``state_dict()``, ``save()``, re-homing and
``close()``, which run between steps, see the step done). The join also runs what the step
leaves to the main thread: clearing the masters' gradients, refreshing tied copies, settling
the optimizer-state charge. The time the main thread waits there is the ``"update"`` stall
in ``trainer.stats``; the worker's time is the ``"update"`` busy time.

An NVMe-homed pack's update (:mod:`harmony.runtime.chunked_update`) streams its chunks through host
memory while it runs: it allocates buffers and issues reads and writes. So that it never
waits for host room the runtime's thread would free (while that thread may be waiting for
it), it runs from a :class:`swap.tier.Reservation` of its three largest consecutive chunks,
charged on the runtime's thread before the step is submitted and given back when it is
joined; the chunks staged behind the backward are adopted into it. If the runtime's thread
then finds the host tier full, the tier's ``when_full`` hook joins the step (which can always
finish) and the request is retried. Where the reservation does not fit, the update runs in
line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from swap.stats import Stats

LINK = "update"  # the name of the worker in Stats' busy and stall seconds


class UpdateWorker:
    """One thread running one optimizer step at a time.

    Args:
        stats: where the waits (stall) and the steps' time (busy) are counted.

    >>> w = UpdateWorker(Stats())
    >>> w.submit(3, lambda: None, lambda: print("joined"))
    >>> w.pending
    3
    >>> w.join()
    joined
    >>> w.close()
    """

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="harmony-update")
        self._job: tuple[int, Future[float], Callable[[], None]] | None = None
        self._thread: int | None = None  # the worker thread's ident, once it has run

    def on_thread(self) -> bool:
        """Whether the caller is the worker thread."""
        return threading.get_ident() == self._thread

    @property
    def pending(self) -> int | None:
        """The pack whose step is in flight (None: none)."""
        return self._job[0] if self._job is not None else None

    def submit(self, pack: int, step: Callable[[], None], then: Callable[[], None]) -> None:
        """Join the step in flight, then start ``step()`` on the worker; ``then()`` runs on
        the calling thread when the step is joined."""
        self.join()

        def timed() -> float:
            self._thread = threading.get_ident()
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        self._job = (pack, self._executor.submit(timed), then)

    def join(self, pack: int | None = None) -> None:
        """Wait for the step in flight (re-raising its error) and run its ``then``; with
        ``pack``, only if the step in flight is that pack's."""
        if self._job is None or (pack is not None and self._job[0] != pack):
            return
        _, future, then = self._job
        self._job = None
        t0 = time.perf_counter()
        busy = future.result()
        self.stats.stall(LINK, time.perf_counter() - t0)
        self.stats.busy(LINK, busy)
        then()

    def abandon(self) -> None:
        """After a failure: wait for the step in flight, dropping its error and its ``then``."""
        if self._job is not None:
            self._job[1].exception()
            self._job = None

    def close(self) -> None:
        self.abandon()
        self._executor.shutdown(wait=True)
