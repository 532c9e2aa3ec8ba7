"""A copier with CUDA's semantics on CPU: copies run late, and ``wait`` tells the host nothing.

What CUDA does (and what code written against :class:`swap.handle.Handle` may rely on):

* A copy is *issued* on its link's copy stream. A stream is a FIFO: its copies run in issue
  order, one after the other, at some later time. When the copy is issued, its stream first
  waits for the work already issued on the compute stream (see
  :class:`swap.streams.CudaCopier`), so the copy sees what compute wrote before, but nothing
  orders it against compute issued *after* it.
* ``handle.wait()`` makes the compute stream wait on the copy's event: compute issued later
  runs after the copy, and so does every copy issued later on any stream (each waits for the
  compute stream when issued). The host thread returns at once and knows nothing: the copy may
  not even have started.
* ``handle.synchronize()`` blocks the host until the copy has run. Only now does the host
  *know* it finished; and since the copy's stream ran it in order after what that stream
  waited for, the host then also knows every earlier copy of the same link has finished, and
  every copy the compute stream had been made to wait for when this copy was issued.
* ``handle.done()`` queries the event. On a slow GPU it is False until the copy ran; when it
  returns True the host knows as much as after ``synchronize``.
* Errors of a copy do not surface at ``wait``; the host sees them when it synchronizes.
* A host buffer may be read, overwritten or handed to another user only once the host knows
  every copy touching it has finished; a device buffer once every copy touching it is ordered
  before the device work that uses it next (waited for by the compute stream, or known).

:class:`DeferredCopier` behaves as the most adversarial legal GPU, an arbitrarily slow one.
``copy`` only enqueues (keeping ``src`` and ``dst`` alive until the copy ran). ``wait`` must
then run the copy, and the earlier copies of its link, on the calling thread (compute on CPU
runs at once, so work ordered after the copy needs it done), but it gives the host no
knowledge: ``done()`` stays False. ``synchronize`` runs it if needed and makes it, the earlier
copies of its link and whatever its stream waited for host-known; ``done()`` is True only for
host-known copies. :meth:`DeferredCopier.synchronize` (a device synchronization) makes every
copy host-known and re-raises the first error not yet raised. A copy that nobody waits for
runs only at a synchronization, so a consumer that forgot to wait reads stale bytes, and a
buffer given back while a copy may still read it is reported by :mod:`swap.ledger`, which this
copier feeds with every copy's byte ranges.

Threads: the runtime, the update worker and the engine's follow-up threads all use one copier.
A lock guards its books; each link has a runner lock so that its copies run one at a time in
issue order; no lock is held while waiting for anything else, so a follow-up thread that
synchronizes a copy runs it itself.

Select it for a whole run with ``HARMONY_COPIER=deferred`` (``python -m pytest
--copier=deferred`` sets it): :func:`swap.streams.make_copier` then builds one for every engine.

>>> c = DeferredCopier(torch.device("cpu"))
>>> dst = torch.zeros(2); h = c.copy(dst, torch.ones(2), "host->device", lambda s: None)
>>> dst.tolist(), h.done()                 # issued, not run
([0.0, 0.0], False)
>>> h.wait(); dst.tolist(), h.done()       # ran for compute; the host knows nothing
([1.0, 1.0], False)
>>> h.synchronize(); h.done()
True
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from swap.handle import DoneHandle
from swap.ledger import Ledger, caller_site


class DeferredCopy:
    """One enqueued copy: its link, its place in the link's order, its tensors and its fate.

    ``implied``: per link, the highest sequence number known finished once this copy is (its
    link's earlier copies, and the copies compute was made to wait for when it was issued).
    """

    __slots__ = ("dst", "error", "implied", "link", "on_done", "ran", "reported", "run",
                 "seq", "site", "src")

    def __init__(self, link: str, seq: int, dst: torch.Tensor, src: torch.Tensor,
                 run: Callable[[], Any], on_done: Callable[[float], None],
                 implied: dict[str, int], site: str) -> None:
        self.link, self.seq, self.dst, self.src = link, seq, dst, src
        self.run, self.on_done, self.implied, self.site = run, on_done, implied, site
        self.ran = False
        self.reported = False
        self.error: BaseException | None = None

    def describe(self) -> str:
        """``'copy #3 on host->device (issued at harmony/runtime/runtime.py:318)'``."""
        return f"copy #{self.seq} on {self.link} (issued at {self.site})"


class DeferredHandle:
    """The handle of a :class:`DeferredCopy` (see the module's text for what each call means)."""

    def __init__(self, copier: DeferredCopier, copy: DeferredCopy) -> None:
        self.copier, self.copy = copier, copy
        self.device: torch.device | None = copier.device

    def done(self) -> bool:
        """True once the host knows the copy finished (never before a synchronization)."""
        return self.copier.known(self.copy)

    def wait(self) -> None:
        """Order later work after the copy: run it now; the host learns nothing."""
        self.copier.order(self.copy)

    def synchronize(self) -> None:
        """Run the copy if needed and make it host-known; re-raises its error."""
        self.copier.synchronize_copy(self.copy)


class DeferredCopier:
    """Copies queued per link and run only when work is ordered after them (see the module).

    Args:
        device: the compute device the handles belong to.

    Attributes:
        ledger: the byte ranges of the copies not yet host-known (:class:`swap.ledger.Ledger`),
            against which watched tiers check their buffers.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.RLock()  # the books below; never held while a copy runs
        self._queues: dict[str, deque[DeferredCopy]] = {}
        self._runners: dict[str, threading.Lock] = {}
        self._issued: dict[str, int] = {}   # link -> the last sequence number issued
        self._ordered: dict[str, int] = {}  # link -> compute waits for copies up to this one
        self._known: dict[str, int] = {}    # link -> the host knows copies up to this one ended
        self._failed: list[DeferredCopy] = []  # failed copies whose error was not raised yet
        self.ledger = Ledger(self, self._lock)

    # -- issuing -----------------------------------------------------------------------------
    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str,
             on_done: Callable[[float], None], ready: object = None) -> DeferredHandle:
        """Enqueue ``dst.copy_(src)`` on ``link``; it runs when something is ordered after it.

        ``ready``: a :meth:`mark` taken earlier (by the thread that issued the transfer): the
        copy's stream then waits for the compute ordered by that mark, not for what compute
        was made to wait for since, as a CUDA copy issued from a follow-up thread does."""
        marks = ready if isinstance(ready, dict) else None
        return self.enqueue(link, dst, src, lambda: dst.copy_(src), on_done, marks)

    def mark(self) -> dict[str, int]:
        """What the compute stream has been made to wait for so far (per link, the last copy
        ordered): the CPU model of an event recorded on the issuing thread's stream."""
        with self._lock:
            return dict(self._ordered)

    def enqueue(self, link: str, dst: torch.Tensor, src: torch.Tensor, run: Callable[[], Any],
                on_done: Callable[[float], None],
                marks: dict[str, int] | None = None) -> DeferredHandle:
        """Enqueue ``run`` as a copy from ``src`` into ``dst`` on ``link`` (:meth:`copy`'s
        body; a test passes a failing ``run`` to see where its error surfaces).

        Raises:
            swap.ledger.BufferLifetimeError: ``src`` or ``dst`` lies in a buffer a watched
                tier holds in its pool (the copy would touch memory given back).
        """
        site = caller_site()
        with self._lock:
            seq = self._issued.get(link, 0) + 1
            # this copy's stream waits for the compute stream (as of the mark, if given)
            implied = dict(self._ordered if marks is None else marks)
            implied[link] = seq
            copy = DeferredCopy(link, seq, dst, src, run, on_done, implied, site)
            self.ledger.register(copy)  # (raises before anything is queued)
            self._issued[link] = seq
            self._queues.setdefault(link, deque()).append(copy)
            self._runners.setdefault(link, threading.Lock())
        return DeferredHandle(self, copy)

    def submit(self, link: str, fn: Callable[[], None],
               on_done: Callable[[float], None]) -> DoneHandle:
        """Host work (as on CUDA): run ``fn`` now on the calling thread."""
        t0 = time.perf_counter()
        fn()
        on_done(time.perf_counter() - t0)
        return DoneHandle()

    # -- what the host knows -----------------------------------------------------------------
    def known(self, copy: DeferredCopy) -> bool:
        """Whether the host knows ``copy`` has finished."""
        with self._lock:
            return self._known.get(copy.link, 0) >= copy.seq

    def ordered(self, copy: DeferredCopy) -> bool:
        """Whether device work issued from now on runs after ``copy`` (waited for or known)."""
        with self._lock:
            return max(self._ordered.get(copy.link, 0), self._known.get(copy.link, 0)) \
                >= copy.seq

    def implied(self, copy: DeferredCopy) -> dict[str, int]:
        """Per link, the last copy known finished once ``copy`` is known finished."""
        return copy.implied

    # -- running -----------------------------------------------------------------------------
    def _run_through(self, copy: DeferredCopy) -> None:
        """Run ``copy``'s link up to and including ``copy``, in order, on this thread."""
        with self._lock:
            runner = self._runners[copy.link]
        with runner:  # (another thread may be running this link: it then runs ours too)
            while not copy.ran:
                with self._lock:
                    head = self._queues[copy.link].popleft()
                self._execute(head)

    def _execute(self, copy: DeferredCopy) -> None:
        t0 = time.perf_counter()
        try:
            copy.run()
        except BaseException as err:  # raised by synchronize (as a CUDA error would be)
            copy.error = err
            with self._lock:
                self._failed.append(copy)
        finally:
            copy.ran = True
            copy.run = _ran
            copy.dst = copy.src = _RAN  # the copy no longer holds its tensors
        copy.on_done(time.perf_counter() - t0)

    def order(self, copy: DeferredCopy) -> None:
        """``wait``: run ``copy`` (and its link's earlier copies) so later work sees it."""
        self._run_through(copy)
        with self._lock:
            self._ordered[copy.link] = max(self._ordered.get(copy.link, 0), copy.seq)

    def synchronize_copy(self, copy: DeferredCopy) -> None:
        """``synchronize``: run ``copy`` if needed and make it host-known; raise its error."""
        self._run_through(copy)
        with self._lock:
            self._learn(copy.implied)
            copy.reported = True
        if copy.error is not None:
            raise copy.error

    def _learn(self, marks: dict[str, int]) -> None:
        """The host now knows the copies up to ``marks`` (per link) finished. Lock held."""
        for link, seq in marks.items():
            if seq > self._known.get(link, 0):
                self._known[link] = seq
                self._ordered[link] = max(self._ordered.get(link, 0), seq)

    def synchronize(self) -> None:
        """A device synchronization: run every queued copy, make all host-known, and raise
        the first error no synchronization has raised yet."""
        with self._lock:
            lasts = [q[-1] for q in self._queues.values() if q]
        for last in lasts:
            self._run_through(last)
        with self._lock:
            self._learn(dict(self._issued))
            failed = [c for c in self._failed if not c.reported]
            self._failed.clear()
            for c in failed:
                c.reported = True
        self.ledger.prune()
        if failed:
            assert failed[0].error is not None
            raise failed[0].error

    def close(self) -> None:
        """Run what is queued (its errors were the step's to raise) and forget every copy."""
        with contextlib.suppress(Exception):  # (a failed copy was its step's to report)
            self.synchronize()


def _ran() -> None:
    raise AssertionError("a deferred copy ran twice")


_RAN = torch.empty(0)  # what a copy's tensors become once it ran (they are let go)
