"""The DeepSpeed async I/O (libaio) engine for the NVMe store, loaded lazily.

DeepSpeed's ``async_io`` op submits O_DIRECT reads and writes through libaio with a queue of
blocks per request and takes page-locked buffers. Building it is a JIT C++ compile of 5 to
15 minutes, so the store only uses an op that is already built unless asked for "aio" by
name; ``.ci/install-aio.sh`` builds it ahead of time.

What the op does not do, and the store makes up for:
- it does not report the result of each block (``io_event.res`` is ignored), so a full disk is
  caught before writing by reserving the file's blocks (:func:`swap.direct_io.reserve`);
  other device errors (EIO) during an aio transfer go unreported;
- its ``wait()`` waits for every request on a handle (and aborts the process when there is
  none), so each worker thread owns one handle and waits only for its own request.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

OP_NAME = "async_io"


class AioUnavailable(RuntimeError):
    """The DeepSpeed async I/O op cannot be used here; the message says why, in a few words."""


def extensions_dir() -> Path:
    """Where torch JIT extensions are built: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions."""
    return Path(
        os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    )


def aio_prebuilt() -> bool:
    """True if finished builds of the op and of the pin_memory op it needs are in
    :func:`extensions_dir` (cheap: imports nothing)."""
    for name in (OP_NAME, "pin_memory"):
        build = extensions_dir() / name
        if not (build / f"{name}.so").is_file() or (build / "lock").exists():
            return False
    return True


def load_aio_op(build: bool) -> Any:
    """Import DeepSpeed and load its async I/O op, building it first if ``build`` allows.

    Sets DS_ACCELERATOR=cpu when unset and CUDA is absent (else DeepSpeed probes for
    accelerators) and TORCH_EXTENSIONS_DIR to :func:`extensions_dir` so the build is found by
    later runs and by ``.ci/install-aio.sh``.

    Raises:
        AioUnavailable: deepspeed missing, libaio missing, op not built (and ``build`` false),
            or the build failed.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not build and not aio_prebuilt():
        raise AioUnavailable(
            f"op not built in {extensions_dir()}; run .ci/install-aio.sh or "
            f"NvmeStore(backend='aio') once, 5-15 minutes"
        )
    try:
        builder_mod = importlib.import_module("deepspeed.ops.op_builder")
    except Exception as e:  # ImportError, or DeepSpeed failing on its own imports
        raise AioUnavailable(f"deepspeed not importable: {type(e).__name__}: {e}") from e
    builder = builder_mod.AsyncIOBuilder()
    # DeepSpeed checks by compiling a test program against libaio: where it fails, say so
    # rather than show the compiler error of a doomed build.
    if not builder.is_compatible(verbose=False):
        raise AioUnavailable("libaio-dev missing: apt-get install -y libaio-dev")
    try:
        return builder.load(verbose=False)
    except Exception as e:  # a compiler error, ninja missing, a link error...
        raise AioUnavailable(f"op build failed: {type(e).__name__}: {e}".splitlines()[0]) from e


class AioIO:
    """Blocking chunk I/O through the DeepSpeed op, one ``aio_handle`` per worker thread.

    Args:
        op: the loaded op (from :func:`load_aio_op`).
        block_size: bytes per libaio request (iocb).
        queue_depth: iocbs in flight per handle; a chunk of ``block_size * queue_depth`` bytes
            goes to the disk at once.
    """

    name = "aio"
    direct = True
    open_flags: int = getattr(os, "O_DIRECT", 0)

    def __init__(
        self, op: Any, block_size: int = 1 << 20, queue_depth: int = 16, alignment: int = 4096
    ) -> None:
        self._op = op
        self._alignment = alignment
        self._block_size = block_size
        self._queue_depth = queue_depth
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._main = self._handle()

    def _handle(self) -> Any:
        h = getattr(self._local, "handle", None)
        if h is None:
            # intra_op_parallelism=1: the store already spreads chunks over its threads.
            h = self._op.aio_handle(self._block_size, self._queue_depth, False, True, 1)
            self._local.handle = h
            with self._lock:
                self._handles.append(h)
        return h

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A page-locked, page-aligned uint8 tensor the op writes from without a bounce copy.

        The op hands out raw memory; wrapping it in a ctypes array that the tensor's storage
        holds (via the buffer protocol) frees it exactly when the last tensor or storage
        using it is gone.
        """
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        raw = self._main.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        if raw.data_ptr() == 0:
            raise MemoryError(f"could not allocate {nbytes} bytes of page-locked memory")
        owner = (ctypes.c_uint8 * nbytes).from_address(raw.data_ptr())
        weakref.finalize(owner, self._main.free_cpu_locked_tensor, raw)
        return torch.frombuffer(owner, dtype=torch.uint8)

    def zero_copy(self, buf: torch.Tensor) -> bool:
        # Anything else is still correct: the op bounces it through page-locked memory it
        # allocates, locks and frees per request, which is slower than the store's pool.
        return bool(self._main.is_pinned(buf)) and buf.data_ptr() % self._alignment == 0

    def pwrite(self, fd: int, path: str, buf: torch.Tensor, offset: int) -> None:
        h = self._handle()
        # The op writes to our fd and leaves it open; buf stays owned by the caller until wait().
        if h.async_pwrite(buf, fd, offset) != 0:
            raise OSError(errno.EIO, "DeepSpeed aio could not start the write", path)
        h.wait()

    def pread(self, fd: int, path: str, buf: torch.Tensor, offset: int) -> None:
        h = self._handle()
        # The op opens and closes the file by name itself (it has no fd form for reads).
        if h.async_pread(buf, path, offset) != 0:
            raise OSError(errno.EIO, "DeepSpeed aio could not start the read", path)
        h.wait()

    def close(self) -> None:
        # A handle's destructor joins its threads; dropping them once nothing is in flight is safe.
        with self._lock:
            self._handles.clear()
        self._local = threading.local()
