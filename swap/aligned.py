"""Page-aligned byte buffers and a bounded pool of them, for direct (O_DIRECT / libaio) I/O.

Direct I/O moves bytes between the disk and user memory without the page cache, so the
kernel insists that the buffer address, the file offset and the length are all multiples of
the device's logical block size. Torch's CPU allocator only promises 64-byte alignment, so the
NVMe store either does I/O straight from memory that came from here, or stages through a
small pool of buffers from here.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable

import torch

PAGE = mmap.PAGESIZE


def round_up(n: int, alignment: int) -> int:
    """The smallest multiple of ``alignment`` that is ``>= n`` (``round_up(5, 4096) == 4096``)."""
    return -(-n // alignment) * alignment


def check_alignment(alignment: int) -> None:
    """Raise ValueError unless ``alignment`` is a power of two of at least 512 bytes."""
    if alignment < 512 or alignment & (alignment - 1):
        raise ValueError(
            f"alignment={alignment} must be a power of two >= 512 (the smallest logical block "
            f"size of a disk); use 4096 unless the device needs more"
        )


def aligned_empty(nbytes: int, alignment: int = PAGE) -> torch.Tensor:
    """A new uint8 CPU tensor of exactly ``nbytes`` whose first byte is ``alignment``-aligned.

    The memory is an anonymous mmap (so it is page-aligned and zero-filled by the kernel); the
    tensor's storage keeps the mmap alive, so views and storages of it stay valid as long as
    they exist.

    Args:
        nbytes: size of the tensor in bytes (0 is allowed).
        alignment: a power of two; above the page size the mapping is over-allocated.

    Returns:
        A contiguous ``torch.uint8`` tensor of shape ``(nbytes,)``.

    Example:
        >>> buf = aligned_empty(10_000)
        >>> buf.data_ptr() % 4096, buf.numel()
        (0, 10000)
    """
    extra = 0 if alignment <= PAGE else alignment
    size = max(round_up(nbytes, PAGE) + extra, PAGE)  # mmap refuses length 0
    whole = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
    skip = (-whole.data_ptr()) % alignment
    return whole[skip : skip + nbytes]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor of any dtype (no copy).

    Raises:
        ValueError: if ``t`` is not a contiguous CPU tensor.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(
            f"expected a contiguous CPU tensor, got device={t.device} "
            f"contiguous={t.is_contiguous()}; pass t.contiguous().cpu()"
        )
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def memview(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview over a contiguous CPU tensor (no copy), for os.preadv/pwritev.

    The caller keeps ``t`` alive while the view is in use: the view does not own the memory.
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` into ``dst`` (uint8, contiguous, same size) with one plain memmove.

    Not ``dst.copy_(src)``: called from several I/O worker threads at once, torch would start
    an OpenMP team in each, whose spinning threads starve the threads that drive the disk
    (measured: DeepSpeed aio writes through staging fell from ~0.9 to ~0.3 GB/s). The workers
    already copy in parallel. ctypes releases the GIL for the call.
    """
    n = src.numel()
    if dst.numel() != n:
        raise ValueError(f"copy_bytes: dst has {dst.numel()} bytes, src {n}")
    if n:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)


class StagingPool:
    """A bounded set of reusable aligned buffers of one size.

    Used to bounce unaligned user tensors through aligned memory. ``acquire`` blocks while all
    ``count`` buffers are out, so the pool never grows past ``count * nbytes``; give each
    worker thread at most one buffer at a time and size ``count`` to the number of workers so
    that nothing ever waits.

    Args:
        count: the most buffers that exist at once.
        nbytes: the size of each buffer.
        alloc: makes one buffer (e.g. :func:`aligned_empty`, or page-locked memory of an aio op).

    Example:
        >>> pool = StagingPool(2, 1 << 20, aligned_empty)
        >>> with pool.borrow() as buf:
        ...     buf[:3] = 7
    """

    def __init__(self, count: int, nbytes: int, alloc: Callable[[int], torch.Tensor]) -> None:
        self._cond = threading.Condition()
        self._free: list[torch.Tensor] = []
        self._made = 0
        self._count = count
        self._nbytes = nbytes
        self._alloc = alloc

    def acquire(self) -> torch.Tensor:
        """Take a buffer (making one if fewer than ``count`` exist); blocks while none is free."""
        with self._cond:
            while not self._free and self._made >= self._count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        # Allocate outside the lock: mmap/mlock of megabytes takes a while.
        return self._alloc(self._nbytes)

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer taken with :meth:`acquire`."""
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def borrow(self) -> _Borrowed:
        """``with pool.borrow() as buf:`` takes a buffer and gives it back at the end."""
        return _Borrowed(self)

    def clear(self) -> None:
        """Drop the idle buffers (their memory goes when no tensor refers to it)."""
        with self._cond:
            self._made -= len(self._free)
            self._free.clear()


class _Borrowed:
    def __init__(self, pool: StagingPool) -> None:
        self._pool = pool
        self._buf: torch.Tensor | None = None

    def __enter__(self) -> torch.Tensor:
        self._buf = self._pool.acquire()
        return self._buf

    def __exit__(self, *exc: object) -> None:
        assert self._buf is not None
        self._pool.release(self._buf)
        self._buf = None
