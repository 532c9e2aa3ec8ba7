"""Host memory as the operating system counts it: the process's resident set, and malloc kept
from holding on to what harmony frees.

The budgets bound what harmony's tiers account; what the kernel counts (the resident set, RSS)
also holds whatever the C allocator keeps after a free. With glibc's default *dynamic* mmap
threshold, the first large block freed raises the threshold to that block's size (up to 32
MiB): from then on, blocks below it (a pack's weights or gradients, a layer's activations)
come from malloc's heaps, whose freed memory goes back to the kernel only from the top of a
heap. Blocks of many sizes, freed in another order than allocated, then leave the heaps
fragmented, holding hundreds of MiB that no tensor uses (``examples/bench_memory.py`` with
``HARMONY_MALLOC=off`` shows it; BENCHMARKS.md). :func:`bound_malloc` fixes the threshold at 1 MiB
(``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic adjustment off), so every block of
1 MiB or more is a mapping of its own, returned to the kernel when freed; the cost is a page
fault per 4 KiB page the next time such memory is touched, small next to the compute that
touches it. :func:`trim` returns the heaps' free pages after phases that free much at once
(building packs).

Both act on glibc only and are skipped elsewhere, or when the user chose malloc's settings
(``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES`` in the environment), or set
``HARMONY_MALLOC=off``.

>>> rss_bytes() > 0
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from functools import cache
from pathlib import Path

import psutil

MMAP_THRESHOLD = 1 << 20  # bytes: blocks from this size on are mappings of their own
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)

_state: dict[str, str] = {}


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def bound_malloc() -> str:
    """Fix glibc malloc's mmap threshold at :data:`MMAP_THRESHOLD` (see the module's text),
    once per process; returns what was done, in words (``harmony env`` shows it).

    Example::

        >>> bound_malloc()  # doctest: +ELLIPSIS
        '...'
    """
    if "malloc" in _state:
        return _state["malloc"]
    libc = _glibc()
    if os.environ.get("HARMONY_MALLOC", "").lower() in ("off", "0", "no"):
        what = "left as it is (HARMONY_MALLOC=off)"
    elif libc is None:
        what = "left as it is (not glibc)"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        what = "left as it is (the environment sets malloc's mmap threshold)"
    elif libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
        what = f"glibc mmap threshold fixed at {MMAP_THRESHOLD >> 20} MiB"
    else:
        what = "left as it is (mallopt refused)"
    _state["malloc"] = what
    return what


def trim() -> None:
    """Give the free pages of malloc's heaps back to the kernel (glibc's ``malloc_trim``);
    a no-op elsewhere or with ``HARMONY_MALLOC=off``."""
    libc = _glibc()
    if libc is not None and os.environ.get("HARMONY_MALLOC", "").lower() not in (
            "off", "0", "no"):
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """The process's resident set size, bytes."""
    return int(psutil.Process().memory_info().rss)


def available_bytes() -> int:
    """Bytes of memory the system can give without swapping (``MemAvailable``)."""
    return int(psutil.virtual_memory().available)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start measuring the peak resident set afresh (Linux: ``VmHWM`` is reset by writing 5 to
    ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """The peak resident set since the process started or :func:`reset_peak_rss` (Linux's
    ``VmHWM``); None where the kernel does not tell."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
