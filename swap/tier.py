"""Tiers: where bytes live, with accounting against a capacity and a pool of reusable buffers.

A :class:`Tier` hands out flat ``uint8`` buffers on its torch device (pinned when it is the host
tier of a CUDA run: page-locked at their own size by :class:`swap.pinned.PinnedAllocator`, never
through PyTorch's power-of-two caching host allocator), charges their bytes against its
capacity, and keeps released buffers for reuse, so a steady-state step allocates nothing new.
New buffers are made outside the tier's lock (pinning them is slow). Tensors the tier did not
allocate (a layer's outputs, optimizer state, working memory) are accounted with
:meth:`Tier.charge`.

Free buffers kept for reuse are not charged (they are the allocator's, like the blocks PyTorch's
caching allocator reserves); at most ``cache_limit`` bytes of them are kept. On a CUDA device tier
the pool is off by default, since PyTorch's caching allocator already reuses device blocks.

A release may wait on a copy still reading the buffer: ``release(buf, after=handle)`` keeps the
bytes charged until that copy is done. When a request would exceed the capacity, the tier first
takes back what finished copies freed, then waits for the oldest pending ones, and only then
raises :class:`OutOfCapacity`: the accounted bytes never exceed the capacity.

A tier may also be given the level its plan predicts (:meth:`Tier.plan_for`): a request that
would take the books above it first waits for pending releases (a disk slower than planned
still writing a buffer back, say), so the bytes held follow the plan whatever the copies'
speed; with none pending it goes ahead (the level is a prediction, the capacity the bound).

Threads: every method may be called from any thread (one lock guards the books; no lock is held
while waiting for a copy). A thread that must not compete with another for room, such as the
optimizer step of an NVMe-homed pack on the update worker, takes a :class:`Reservation`: bytes
charged up front on the issuing thread, from which it allocates and releases without ever
waiting for room. When a request does not fit, the tier calls its ``when_full`` hook (outside
the lock) before raising: the runtime there joins the update in flight, whose reservation then
comes back, and the request is tried once more.

Checking mode: a tier watched by the deferred copier's ledger (:meth:`Tier.watch`, which the
runtime calls under ``HARMONY_COPIER=deferred``) checks at every release, reuse and return to
its pool that no copy may still touch the buffer, and poisons pooled buffers (see
:mod:`swap.ledger`). Unwatched tiers (the production path) pay one ``is None`` test per call.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from typing import TypeVar

import torch

from swap.handle import Handle
from swap.ledger import Ledger, caller_site

_T = TypeVar("_T")


class OutOfCapacity(MemoryError):
    """A tier was asked for more bytes than its capacity allows."""

    def __init__(self, tier: str, nbytes: int, used: int, capacity: int, what: str) -> None:
        self.tier, self.nbytes, self.used, self.capacity = tier, nbytes, used, capacity
        super().__init__(f"{tier} tier: {what} needs {fmt_bytes(nbytes)} but {fmt_bytes(used)} of "
                         f"its {fmt_bytes(capacity)} are in use")


def size_class(n: int) -> int:
    """``n`` rounded up to a multiple of an eighth of the largest power of two <= n."""
    if n <= 4096:
        return n
    step = (1 << (n.bit_length() - 1)) // 8
    return (n + step - 1) // step * step


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.50KiB'``; used in every message that shows a size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Tier:
    """One place bytes live, with a byte budget.

    Args:
        name: ``"device"``, ``"host"`` or ``"nvme"`` (used in stats and messages).
        device: the torch device its buffers are allocated on.
        capacity: bytes it may hold; None for no limit.
        pin: allocate page-locked host memory (only meaningful with CUDA present), with a
            :class:`swap.pinned.PinnedAllocator` unless ``alloc`` is given.
        cache_limit: bytes of free buffers kept for reuse; default: the capacity (unlimited when
            there is none), 0 on a CUDA device.
        share_capacity: free buffers kept for reuse share the capacity with what is in use
            (used + cached <= capacity, trimmed only when a new buffer is needed), for a tier
            whose budget is physical memory, like pinned host memory.
        alloc: makes a new uint8 buffer of n bytes (default ``torch.empty`` on ``device``);
            e.g. the NVMe store's page-aligned allocator, so its I/O needs no staging copy.

    >>> t = Tier("device", torch.device("cpu"), capacity=1024)
    >>> buf = t.allocate(512); t.used
    512
    >>> t.release(buf); t.used, t.peak
    (0, 512)
    """

    def __init__(self, name: str, device: torch.device, capacity: int | None = None,
                 pin: bool = False, cache_limit: int | None = -1, share_capacity: bool = False,
                 alloc: Callable[[int], torch.Tensor] | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"{name} tier capacity must be >= 0 bytes, got {capacity}")
        self.name, self.device, self.capacity, self.pin = name, device, capacity, pin
        if cache_limit == -1:
            cache_limit = 0 if device.type == "cuda" else capacity
        self.cache_limit = None if share_capacity else cache_limit
        self._share = share_capacity  # (as asked: it applies while there is a capacity)
        self.share_capacity = share_capacity and capacity is not None
        if alloc is None and pin and device.type == "cpu":
            from swap.pinned import PinnedAllocator

            alloc = PinnedAllocator()
        self._alloc = alloc
        self.used = 0
        self.peak = 0
        self.planned: int | None = None  # the level pending releases are waited for above
        self.allocations = 0  # buffers created (not reused): constant in a steady state
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._cached = 0
        self._bases: dict[int, torch.Tensor] = {}  # data_ptr of a best-fit buffer -> the whole
        self._pending: deque[tuple[Handle, int, torch.Tensor | None]] = deque()
        self._lock = threading.Lock()  # guards the books: used, peak, the pool, the pending
        # Called (outside the lock) when a request does not fit even after the pending
        # releases: returns True if it gave bytes back, and the request is tried once more.
        self.when_full: Callable[[], bool] | None = None
        self.ledger: Ledger | None = None  # checking mode (see watch)
        self.device_memory = False  # (for the checks: a device's memory, touched by streams)

    def watch(self, ledger: Ledger, device_memory: bool) -> None:
        """Check every release, reuse and return of a buffer against ``ledger`` and poison
        pooled buffers (checking mode: see :mod:`swap.ledger`). ``device_memory``: this tier
        stands for a device's memory (a buffer is settled once device work is ordered after
        its copies), not host memory (settled once the host knows they finished)."""
        self.ledger, self.device_memory = ledger, device_memory

    # -- accounting -------------------------------------------------------------------------
    def charge(self, nbytes: int, what: str = "a tensor") -> None:
        """Account ``nbytes`` of a tensor the tier did not allocate; may raise OutOfCapacity."""
        self._retrying(lambda: self._charge(nbytes, what))

    def _charge(self, nbytes: int, what: str) -> None:
        with self._lock:
            self._make_room(nbytes, what)
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def uncharge(self, nbytes: int, after: Handle | None = None) -> None:
        """Stop accounting ``nbytes`` (once ``after`` is done, if given)."""
        with self._lock:
            if after is not None and not after.done():
                self._pending.append((after, nbytes, None))
            else:
                self.used -= nbytes

    def set_capacity(self, capacity: int | None) -> None:
        """Change the budget (None: no limit), between uses: a trainer's budget set between
        steps, before packs are built under it. Free buffers kept for reuse beyond the new
        budget are dropped now (where they share the capacity).

        Raises:
            ValueError: a negative ``capacity``.

        >>> t = Tier("host", torch.device("cpu"), capacity=1024, share_capacity=True)
        >>> t.release(t.allocate(512)); t.set_capacity(256); t.cached
        0
        """
        if capacity is not None and capacity < 0:
            raise ValueError(f"{self.name} tier capacity must be >= 0 bytes, got {capacity}")
        with self._lock:
            self.capacity = capacity
            self.share_capacity = self._share and capacity is not None
            if capacity is not None and self.share_capacity:
                self._trim_to(capacity - self.used)

    def plan_for(self, level: int | None) -> None:
        """Hold the books at ``level`` bytes (None: no level) by waiting, before a request
        goes above it, for the pending releases (never raising for it).

        >>> t = Tier("host", torch.device("cpu"), capacity=1024)
        >>> t.plan_for(512); t.planned
        512
        """
        with self._lock:
            self.planned = level

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.used

    def reserve(self, nbytes: int, what: str = "a reservation") -> Reservation:
        """Charge ``nbytes`` now, for a :class:`Reservation` to allocate from later."""
        self.charge(nbytes, what)
        return Reservation(self, nbytes, what)

    def _retrying(self, request: Callable[[], _T]) -> _T:
        try:
            return request()
        except OutOfCapacity:
            if self.when_full is None or not self.when_full():
                raise
        return request()

    # -- buffers ----------------------------------------------------------------------------
    def allocate(self, nbytes: int, what: str = "a buffer") -> torch.Tensor:
        """A flat uint8 buffer of exactly ``nbytes`` on this tier, reused when one is free."""
        return self._retrying(lambda: self._allocate(nbytes, what))

    def _allocate(self, nbytes: int, what: str) -> torch.Tensor:
        with self._lock:
            self._make_room(nbytes, what)
            buf, size = self._take(nbytes, self.used, what)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        if buf is not None:
            return buf
        try:  # (the bytes are charged already, so no other request can take them meanwhile)
            return self._new(nbytes, size, what)
        except BaseException:
            with self._lock:
                self.used -= nbytes
            raise

    def _take(self, nbytes: int, used: int, what: str) -> tuple[torch.Tensor | None, int]:
        """A buffer of ``nbytes`` from the pool for ``what``, or (None, the size of a new
        buffer to make with :meth:`_new` once the lock is let go), with ``used`` bytes
        accounted besides it (the books are the caller's). Lock held."""
        free = self._free.get(nbytes)
        fit = None if free else self._best_fit(nbytes)
        if free:
            buf = free.pop()
            self._cached -= nbytes
            if self.ledger is not None:
                self.ledger.reused(self, buf, what)
            return buf, nbytes
        if fit is not None:
            # A slightly larger free buffer serves (packs' buffers differ a little in size):
            # hand out its first nbytes and remember the whole for the release.
            base = self._free[fit].pop()
            self._cached -= fit
            buf = base[:nbytes]
            self._bases[buf.data_ptr()] = base
            if self.ledger is not None:
                self.ledger.reused(self, buf, what)
            return buf, nbytes
        # New buffers get a size class (the next multiple of an eighth of the power of two
        # below), so buffers of similar sizes (packs differ a little) serve each other.
        size = size_class(nbytes) if self.share_capacity else nbytes
        if self.share_capacity:
            assert self.capacity is not None
            self._trim_to(self.capacity - used - size)
        return None, size

    def _new(self, nbytes: int, size: int, what: str) -> torch.Tensor:
        """A new buffer of ``size`` bytes for ``what``, handed out as its first ``nbytes``.
        Lock not held: making (and pinning) memory is slow, and other threads use the tier
        meanwhile."""
        if self._alloc is not None:
            buf = self._alloc(size)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        with self._lock:
            self.allocations += 1
            whole = buf
            if size != nbytes:
                base, buf = buf, buf[:nbytes]
                self._bases[buf.data_ptr()] = base
            if self.ledger is not None:
                self.ledger.created(self, buf, whole, what)
        return buf

    def _best_fit(self, nbytes: int) -> int | None:
        """The smallest cached size in (nbytes, 1.25 * size_class(nbytes)], if any."""
        top = size_class(nbytes) * 5 // 4
        sizes = [s for s, bufs in self._free.items() if bufs and nbytes < s <= top]
        return min(sizes) if sizes else None

    def release(self, buf: torch.Tensor, after: Handle | None = None) -> None:
        """Return ``buf`` to the pool, once ``after`` (a copy still reading it) is done.

        Raises:
            swap.ledger.BufferLifetimeError: (checking mode) a copy touching ``buf`` may still
                run and ``after`` does not cover it.
        """
        if self.ledger is not None:
            self.ledger.check_release(self, buf, after, caller_site())
        with self._lock:
            if after is not None and not after.done():
                self._pending.append((after, buf.numel(), buf))
                return
            self._put_back(buf.numel(), buf)
        if after is not None:
            after.synchronize()  # done: re-raises its error, if it failed

    @property
    def pinned(self) -> int | None:
        """The most bytes this tier's buffers had page-locked at once (None: not pinned)."""
        return getattr(self._alloc, "peak", None) if self.pin else None

    @property
    def cached(self) -> int:
        """Bytes of free buffers kept for reuse (not counted in ``used``)."""
        return self._cached

    def clear_cache(self) -> None:
        self.drain()
        with self._lock:
            if self.ledger is not None:
                for bufs in self._free.values():
                    for buf in bufs:
                        self.ledger.dropped(buf)
            self._free.clear()
            self._cached = 0

    def drain(self) -> None:
        """Wait for every pending release."""
        with self._lock:
            while self._pending:
                self._reclaim_oldest()

    # -- internals (lock held) ----------------------------------------------------------------
    def _put_back(self, nbytes: int, buf: torch.Tensor | None) -> None:
        self.used -= nbytes
        self._give(buf)

    def _give(self, buf: torch.Tensor | None) -> None:
        """Return ``buf`` to the pool (the books are the caller's)."""
        if buf is not None:
            piece, buf = buf, self._bases.pop(buf.data_ptr(), buf)  # the whole of a best fit
            if self.ledger is not None:
                self.ledger.returned(self, piece, buf)
        size = buf.numel() if buf is not None else 0
        if buf is not None and (self.cache_limit is None or size <= self.cache_limit):
            self._trim_cache(size)
            self._free[size].append(buf)
            self._cached += size

    def _reclaim_oldest(self) -> None:
        """Wait for the oldest pending release (the lock is let go meanwhile, so another
        thread may use the tier), then put its bytes back."""
        handle, nbytes, buf = self._pending.popleft()
        self._lock.release()
        try:
            handle.synchronize()
        finally:
            self._lock.acquire()
            self._put_back(nbytes, buf)

    def _reclaim_done(self) -> None:
        keep: deque[tuple[Handle, int, torch.Tensor | None]] = deque()
        finished: list[Handle] = []
        for item in self._pending:
            if item[0].done():
                self._put_back(item[1], item[2])
                finished.append(item[0])
            else:
                keep.append(item)
        self._pending = keep
        for handle in finished:  # the books are straight: now re-raise a failed copy's error
            handle.synchronize()

    def _make_room(self, nbytes: int, what: str) -> None:
        self._reclaim_done()
        if self.planned is not None:  # above the plan's level: the copies behind first
            while self.used + nbytes > self.planned and self._pending:
                self._reclaim_oldest()
        if self.capacity is None:
            return
        while self.used + nbytes > self.capacity and self._pending:
            self._reclaim_oldest()
        if self.used + nbytes > self.capacity:
            raise OutOfCapacity(self.name, nbytes, self.used, self.capacity, what)

    def _trim_cache(self, nbytes: int) -> None:
        """Drop cached buffers (largest first) so that cached + nbytes fits the cache limit."""
        if self.cache_limit is not None:
            self._trim_to(self.cache_limit - nbytes)

    def _trim_to(self, limit: int) -> None:
        for size in sorted(self._free, reverse=True):
            while self._free[size] and self._cached > limit:
                dropped = self._free[size].pop()
                self._cached -= size
                if self.ledger is not None:
                    self.ledger.dropped(dropped)


class Reservation:
    """Bytes of a tier charged up front, handed out as buffers without waiting for room.

    The thread holding it allocates and releases within ``nbytes`` (more raises
    :class:`OutOfCapacity`: the reservation was sized wrong). :meth:`adopt` takes over buffers
    already allocated from the tier, whose bytes are then the reservation's. A buffer released
    with a pending ``after`` leaves the reservation: its bytes stay charged on the tier until
    the copy is done, as with :meth:`Tier.release`. :meth:`close` gives back what is unused.

    >>> t = Tier("host", torch.device("cpu"), capacity=100)
    >>> r = t.reserve(60); t.used
    60
    >>> b = r.allocate(40); r.free, t.used
    (20, 60)
    >>> r.release(b); r.close(); t.used
    0
    """

    def __init__(self, tier: Tier, nbytes: int, what: str) -> None:
        self.tier, self.nbytes, self.what = tier, nbytes, what
        self.free = nbytes  # reserved bytes not handed out

    def adopt(self, buf: torch.Tensor) -> None:
        """Take over ``buf``, allocated from the tier: its bytes now count in this reservation
        (the tier's charge for it becomes the reservation's)."""
        self.nbytes += buf.numel()

    def allocate(self, nbytes: int, what: str = "a buffer") -> torch.Tensor:
        if nbytes > self.free:
            raise OutOfCapacity(f"{self.tier.name} reservation", nbytes,
                                self.nbytes - self.free, self.nbytes, f"{what} ({self.what})")
        tier = self.tier
        with tier._lock:
            # (its bytes are charged already)
            buf, size = tier._take(nbytes, tier.used - nbytes, f"{what} ({self.what})")
        if buf is None:
            buf = tier._new(nbytes, size, f"{what} ({self.what})")
        self.free -= nbytes
        return buf

    def release(self, buf: torch.Tensor, after: Handle | None = None) -> None:
        """Give ``buf`` back to the reservation, or (``after`` pending) to the tier once the
        copy reading it is done."""
        if after is not None and not after.done():
            self.tier.release(buf, after)  # (its bytes, charged by us, are the tier's now)
            self.nbytes -= buf.numel()
            return
        if self.tier.ledger is not None:
            self.tier.ledger.check_release(self.tier, buf, after, caller_site())
        with self.tier._lock:
            self.tier._give(buf)
        self.free += buf.numel()
        if after is not None:
            after.synchronize()

    def close(self) -> None:
        """Uncharge the unused bytes; buffers still out stay charged until released."""
        self.tier.uncharge(self.free)
        self.nbytes -= self.free
        self.free = 0
