"""Which copies touch which bytes, and the buffer-lifetime checks built on it.

Under the deferred copier (:mod:`swap.deferred`) every copy registers the byte ranges it reads
(its source) and writes (its destination), by storage: a view or slice of a pool buffer counts
by its byte range of the buffer's storage. A copy's ranges are forgotten once the host knows it
finished. Tiers watched by the ledger (:meth:`swap.tier.Tier.watch`) ask it, and the runtime
asks it before the host itself touches a buffer (:meth:`swap.engine.SwapEngine.host_write`):

* at ``release(buf, after=h)``: every copy touching ``buf`` is *settled*, or ``h`` covers it
  (``h`` is that copy's handle, a later copy of the same link, a group or chained handle holding
  one, or anything whose completion implies it: see :mod:`swap.deferred`);
* when a released buffer goes back to the pool, and when ``allocate`` hands a pooled buffer out:
  every copy touching it is settled;
* at a host write (a file read into the buffer, an optimizer step writing master weights, a
  refresh of a tied copy): every copy touching the range is settled; at a host read (a file
  written from it): every copy writing the range is;
* when a copy is issued: it touches no buffer that is in a pool (given back), and no bytes
  that a copy of another link reads or writes (one of the two writing) unless that copy is
  ordered before it (waited for by compute, or known): the two streams would race on a GPU.

*Settled* means: host-known (the host synchronized it, or something implying it) for host
memory; for device memory (the device tier), ordered before later device work (waited for, or
known), since only device work on streams ordered after the compute stream touches it next.

A failed check raises :class:`BufferLifetimeError` naming the buffer (tier and what it was
allocated for), the copy (link, number, where it was issued) and the site (file:line of the
caller). In poison mode (the default of the deferred copier) every buffer going back to a pool
and every new pool buffer is filled with 0xFF bytes (NaN in every float dtype), so a later use
of stale bytes shows up as a wrong result in the bitwise tests.

>>> from swap.deferred import DeferredCopier
>>> from swap.tier import Tier
>>> copier = DeferredCopier(torch.device("cpu"))
>>> host = Tier("host", torch.device("cpu")); host.watch(copier.ledger, device_memory=False)
>>> buf = host.allocate(8, "weights of pack 0")
>>> h = copier.copy(torch.empty(8, dtype=torch.uint8), buf, "host->device", lambda s: None)
>>> h.wait()                              # compute waited: the host knows nothing
>>> host.release(buf)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
swap.ledger.BufferLifetimeError: host tier buffer 'weights of pack 0' released at ...
>>> host.release(buf, after=h)            # back to the pool once the copy is known ended
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from swap.handle import Handle, parts


class DeferredCopy(Protocol):
    """What the ledger reads of a copy (:class:`swap.deferred.DeferredCopy`)."""

    link: str
    seq: int
    src: torch.Tensor
    dst: torch.Tensor

    def describe(self) -> str: ...


class DeferredCopier(Protocol):
    """What the ledger asks the copier feeding it (:class:`swap.deferred.DeferredCopier`)."""

    # (a copy of the copier's own kind: typed Any so the copier's own signatures match)
    def known(self, copy: Any) -> bool: ...

    def ordered(self, copy: Any) -> bool: ...

    def implied(self, copy: Any) -> dict[str, int]: ...

_ROOT = Path(__file__).resolve().parents[1]
_SKIP = {str(Path(__file__).resolve().parent / f) for f in
         ("ledger.py", "deferred.py", "tier.py", "engine.py", "handle.py")}


class BufferLifetimeError(RuntimeError):
    """A buffer was released, reused, written or read while a copy touching it may still run."""


class WatchedTier(Protocol):
    """What the ledger needs of a tier: its name, and whether it is device memory."""

    name: str
    device_memory: bool


def caller_site(depth: int = 2) -> str:
    """``'harmony/runtime/runtime.py:550 (from harmony/runtime/runtime.py:258)'``: the first
    ``depth`` frames of the calling stack outside the swap engine, tiers, handles and this
    ledger."""
    frame = sys._getframe(1)
    found: list[str] = []
    while frame is not None and len(found) < depth:
        name = frame.f_code.co_filename
        if name not in _SKIP:
            path = Path(name)
            try:
                shown = str(path.resolve().relative_to(_ROOT))
            except ValueError:
                shown = path.name
            found.append(f"{shown}:{frame.f_lineno}")
        frame = frame.f_back  # type: ignore[assignment]
    if not found:
        return "?"
    return found[0] + (f" (from {', '.join(found[1:])})" if len(found) > 1 else "")


def span(t: torch.Tensor) -> tuple[int, int, int]:
    """``(storage address, first byte, end byte)`` of the bytes ``t`` may touch."""
    storage = t.untyped_storage()
    size = t.element_size()
    start = int(t.storage_offset()) * size
    if t.numel() == 0:
        return storage.data_ptr(), start, start
    extent = sum((int(n) - 1) * int(s) for n, s in zip(t.shape, t.stride())) + 1
    return storage.data_ptr(), start, start + extent * size


@dataclass
class _Use:
    """A copy's read or write of the bytes [start, end) of one storage."""

    start: int
    end: int
    copy: DeferredCopy
    writes: bool
    tensor: torch.Tensor  # keeps the storage (and so its address) alive while the use counts


@dataclass
class _Buffer:
    """A pool buffer's owner: the tier, what it was allocated for, where it was given back."""

    tier: str
    what: str
    device_memory: bool
    start: int
    end: int
    released_at: str = ""


class Ledger:
    """The byte ranges of the deferred copier's copies that the host does not know finished.

    Args:
        copier: the copier whose copies it tracks (it answers what is known and ordered).
        lock: the copier's lock, which also guards these books.

    Attributes:
        poison: fill buffers with 0xFF when they go back to a pool or are new (default True).
    """

    def __init__(self, copier: DeferredCopier, lock: threading.RLock) -> None:
        self._copier, self._lock = copier, lock
        self._uses: dict[int, list[_Use]] = {}
        self._owned: dict[int, _Buffer] = {}  # storage address -> the pool buffer handed out
        self._free: dict[int, _Buffer] = {}   # storage address -> a buffer in a pool
        self.poison = True

    # -- copies ------------------------------------------------------------------------------
    def register(self, copy: DeferredCopy) -> None:
        """Record ``copy``'s reads of its source and writes of its destination.

        Raises:
            BufferLifetimeError: it touches a buffer that is in a pool, or bytes another
                link's copy not ordered before it touches (one of the two writing).
        """
        with self._lock:
            uses = []
            for t, writes in ((copy.src, False), (copy.dst, True)):
                if t.device.type == "meta":
                    continue
                key, start, end = span(t)
                if start == end:
                    continue
                free = self._free.get(key)
                if free is not None and start < free.end and free.start < end:
                    raise BufferLifetimeError(
                        f"{copy.describe()} {'writes' if writes else 'reads'} {_name(free)}, "
                        f"which was given back to its pool at {free.released_at}: the copy "
                        "touches memory the pool may hand to anyone; keep the buffer until "
                        "the copy is done, or release it with after= the copy's handle")
                for u in self._live(key):
                    if u.start < end and start < u.end and (u.writes or writes) and \
                            u.copy.link != copy.link and not self._copier.ordered(u.copy):
                        raise BufferLifetimeError(
                            f"{copy.describe()} {'writes' if writes else 'reads'} bytes that "
                            f"{u.copy.describe()} {'writes' if u.writes else 'reads'}, and "
                            "nothing orders that copy before it: on a GPU the two streams "
                            "race; wait for (or synchronize) the earlier copy's handle first")
                uses.append((key, _Use(start, end, copy, writes, t)))
            for key, use in uses:
                self._uses.setdefault(key, []).append(use)

    def prune(self) -> None:
        """Forget the uses of copies the host knows finished."""
        with self._lock:
            for key in list(self._uses):
                self._live(key)

    def _live(self, key: int) -> list[_Use]:
        """The uses of storage ``key`` by copies not known finished (others dropped). Lock held."""
        uses = [u for u in self._uses.get(key, ()) if not self._copier.known(u.copy)]
        if uses:
            self._uses[key] = uses
        else:
            self._uses.pop(key, None)
        return uses

    def _unsettled(self, t: torch.Tensor, device_memory: bool,
                   writes_only: bool = False) -> list[_Use]:
        key, start, end = span(t)
        return [u for u in self._live(key)
                if u.start < end and start < u.end and (u.writes or not writes_only)
                and not (device_memory and self._copier.ordered(u.copy))]

    def _covered(self, after: Handle | None, copy: DeferredCopy) -> bool:
        """Whether ``after`` being done implies ``copy`` finished."""
        if after is None:
            return False
        for h in parts(after):
            inner = getattr(h, "copy", None)
            if getattr(h, "copier", None) is self._copier and inner is not None and \
                    self._copier.implied(inner).get(copy.link, 0) >= copy.seq:
                return True
        return False

    # -- pool buffers ------------------------------------------------------------------------
    def created(self, tier: WatchedTier, buf: torch.Tensor, whole: torch.Tensor,
                what: str) -> None:
        """A new pool buffer ``buf`` (a piece of ``whole``) handed out for ``what``."""
        self._poison(whole)
        self._own(tier, buf, what)

    def reused(self, tier: WatchedTier, buf: torch.Tensor, what: str) -> None:
        """A pooled buffer handed out again for ``what``.

        Raises:
            BufferLifetimeError: a copy touching it is not settled.
        """
        with self._lock:
            for u in self._unsettled(buf, tier.device_memory):
                raise BufferLifetimeError(
                    f"{tier.name} tier buffer handed out for {what!r} at {caller_site()} while "
                    f"{u.copy.describe()} may still {'write' if u.writes else 'read'} it: "
                    f"{_unsettled_why(tier.device_memory)}")
        self._own(tier, buf, what)

    def _own(self, tier: WatchedTier, buf: torch.Tensor, what: str) -> None:
        key, start, end = span(buf)
        with self._lock:
            self._free.pop(key, None)
            self._owned[key] = _Buffer(tier.name, what, tier.device_memory, start, end)

    def check_release(self, tier: WatchedTier, buf: torch.Tensor, after: Handle | None,
                      site: str) -> None:
        """``release(buf, after=after)`` at ``site``.

        Raises:
            BufferLifetimeError: a copy touching ``buf`` is neither settled nor covered by
                ``after``.
        """
        with self._lock:
            owner = self._owned.get(span(buf)[0])
            for u in self._unsettled(buf, tier.device_memory):
                if self._covered(after, u.copy):
                    continue
                name = _name(owner) if owner is not None else f"a {tier.name} tier buffer"
                raise BufferLifetimeError(
                    f"{name} released at {site} while {u.copy.describe()} "
                    f"{'writes' if u.writes else 'reads'} it and "
                    f"{_unsettled_why(tier.device_memory)}; release it with after= a handle "
                    f"covering that copy (its own handle, a later copy on {u.copy.link}, or a "
                    "group holding one), or synchronize the copy first")
            if owner is not None:
                owner.released_at = site

    def returned(self, tier: WatchedTier, buf: torch.Tensor, whole: torch.Tensor) -> None:
        """``buf`` (a piece of ``whole``) goes back to the pool: poison it.

        Raises:
            BufferLifetimeError: a copy touching it is not settled (one issued after its
                release, which the pending release's handle does not cover).
        """
        key = span(buf)[0]
        with self._lock:
            owner = self._owned.pop(key, None)
            if owner is None:
                owner = _Buffer(tier.name, "?", tier.device_memory, *span(whole)[1:])
            for u in self._unsettled(whole, tier.device_memory):
                raise BufferLifetimeError(
                    f"{_name(owner)} goes back to the pool (released at "
                    f"{owner.released_at or '?'}) while {u.copy.describe()} "
                    f"{'writes' if u.writes else 'reads'} it and "
                    f"{_unsettled_why(tier.device_memory)}: a copy issued after the release "
                    "touches the buffer")
            owner.start, owner.end = span(whole)[1:]
            self._free[key] = owner
        self._poison(whole)

    def dropped(self, buf: torch.Tensor) -> None:
        """A pooled buffer left the pool for good (its memory may come back as anything)."""
        with self._lock:
            self._free.pop(span(buf)[0], None)

    def _poison(self, buf: torch.Tensor) -> None:
        if self.poison and buf.numel():
            buf.view(-1).view(torch.uint8).fill_(0xFF)

    # -- the host touching bytes -------------------------------------------------------------
    def host_write(self, t: torch.Tensor, what: str) -> None:
        """The host is about to write ``t`` (``what`` says why).

        Raises:
            BufferLifetimeError: a copy reading or writing those bytes is not settled.
        """
        self._host(t, what, writes_only=False)

    def host_read(self, t: torch.Tensor, what: str) -> None:
        """The host is about to read ``t``.

        Raises:
            BufferLifetimeError: a copy writing those bytes is not settled.
        """
        self._host(t, what, writes_only=True)

    def _host(self, t: torch.Tensor, what: str, writes_only: bool) -> None:
        if t.device.type == "meta" or t.numel() == 0:
            return
        with self._lock:
            owner = self._owned.get(span(t)[0])
            device_memory = owner.device_memory if owner is not None else t.device.type != "cpu"
            for u in self._unsettled(t, device_memory, writes_only):
                name = f" ({_name(owner)})" if owner is not None else ""
                raise BufferLifetimeError(
                    f"the host {'reads' if writes_only else 'writes'} {what}{name} at "
                    f"{caller_site()} while {u.copy.describe()} "
                    f"{'writes' if u.writes else 'reads'} those bytes and "
                    f"{_unsettled_why(device_memory)}: synchronize that copy first")


def _name(owner: _Buffer) -> str:
    return f"{owner.tier} tier buffer {owner.what!r}"


def _unsettled_why(device_memory: bool) -> str:
    return ("no device work is ordered after it yet (wait for its handle)" if device_memory
            else "the host does not know it finished")
