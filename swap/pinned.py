"""Page-locked host memory, pinned at exactly the bytes a buffer needs and unpinned when it goes.

``torch.empty(n, pin_memory=True)`` goes through PyTorch's caching host allocator, which
rounds each block up to a power of two and keeps freed blocks pinned for later pinned
requests: a 65 MiB buffer pins 128 MiB, and memory a tier gave back stays locked. A host tier
that counts its buffers against ``host_memory`` would then understate the memory the process
has locked by up to half.

:class:`PinnedAllocator` instead makes each buffer from anonymous pages (an ``mmap``, page
aligned, as :func:`swap.aligned.aligned_empty`) and page-locks exactly those pages with
``cudaHostRegister``. When the last tensor viewing a buffer is gone, its pages are unregistered
and unmapped. CUDA copies from and to such memory are asynchronous like those of any pinned
memory (``Tensor.is_pinned()`` is True), and the buffers are aligned for O_DIRECT I/O too.

Registration is slow (the driver locks every page), so callers allocate outside their locks.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import weakref
from collections.abc import Callable

import torch

from swap.aligned import PAGE, round_up

log = logging.getLogger("harmony.swap")

CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context of the process, as torch does


def _cuda_register(ptr: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, CUDA_HOST_REGISTER_PORTABLE))


def _cuda_unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


class PinnedAllocator:
    """Makes page-locked uint8 CPU tensors, counting the bytes pinned (a :class:`swap.tier.Tier`
    ``alloc``).

    Args:
        register: ``(address, nbytes) -> error code`` (0: success); default
            ``cudaHostRegister``. A test passes a recorder.
        unregister: ``address -> error code``; default ``cudaHostUnregister``.

    Attributes:
        pinned: bytes registered now (whole pages). peak: the most at any time.
        buffers: buffers alive now.

    Raises (from a call):
        MemoryError: the driver refused to lock the pages; the message names the bytes and
            what to lower.

    Example (with CUDA)::

        alloc = PinnedAllocator()
        buf = alloc(10_000)          # 3 pages pinned, buf.is_pinned() is True
        alloc.pinned                 # 12288
        del buf                      # unpinned and unmapped
    """

    def __init__(self, register: Callable[[int, int], int] | None = None,
                 unregister: Callable[[int], int] | None = None) -> None:
        self._register = register or _cuda_register
        self._unregister = unregister or _cuda_unregister
        self._lock = threading.Lock()
        self.pinned = 0
        self.peak = 0
        self.buffers = 0

    def __call__(self, nbytes: int) -> torch.Tensor:
        """A new page-locked uint8 tensor of exactly ``nbytes`` (its pages are pinned)."""
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        size = round_up(nbytes, PAGE)
        pages = mmap.mmap(-1, size)
        whole = (ctypes.c_char * size).from_buffer(pages)
        ptr = ctypes.addressof(whole)
        err = self._register(ptr, size)
        if err != 0:
            del whole
            pages.close()
            raise MemoryError(
                f"cudaHostRegister of {size} bytes failed (cudaError {err}): the system would "
                f"not page-lock {size} more bytes ({self.pinned} pinned by this allocator "
                "already); lower host_memory, or raise the locked-memory limit (ulimit -l)")
        with self._lock:
            self.pinned += size
            self.peak = max(self.peak, self.pinned)
            self.buffers += 1
        # Runs when the last tensor on these pages is gone (the tensor holds ``whole``): unpin
        # first; the mapping goes after, with the last reference to ``pages`` (the finalizer's
        # and then ``whole``'s own, dropped as its deallocation ends).
        done = weakref.finalize(whole, self._release, ptr, size, pages)
        done.atexit = False  # at exit the process's pages go anyway
        return torch.frombuffer(whole, dtype=torch.uint8)[:nbytes]

    def _release(self, ptr: int, size: int, pages: mmap.mmap) -> None:
        err = self._unregister(ptr)
        if err != 0:  # (a finalizer cannot raise; the pages are unmapped all the same)
            log.warning("harmony: cudaHostUnregister of %d bytes at %#x failed (cudaError %d)",
                        size, ptr, err)
        with self._lock:
            self.pinned -= size
            self.buffers -= 1
        del pages  # (unmapped once ``whole`` has let go of it too)
