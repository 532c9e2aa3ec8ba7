"""The DeepSpeed async I/O (libaio) engine for the NVMe store, loaded lazily.

DeepSpeed's ``async_io`` op submits O_DIRECT reads and writes through libaio with a queue of
blocks per request and takes page-locked buffers. Building it is a JIT C++ compile of 5 to
15 minutes, so nothing builds it unless asked: the store's ``"auto"`` uses an op that is
already built, found without compiling anything (:func:`find_aio`: a JIT build in the torch
extensions cache, loaded straight from its shared libraries, or an op installed with
DeepSpeed), and otherwise O_DIRECT threads. ``harmony env --build-aio``, ``.ci/install-aio.sh``
or ``backend="aio"`` given by name build it, saying first that it may take minutes.

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
import importlib.util
import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

OP_NAME = "async_io"
BUILD_HINT = "harmony env --build-aio builds it (may take several minutes; needs libaio-dev)"
log = logging.getLogger("harmony.swap")
_loaded: dict[str, Any] = {}


class AioUnavailable(RuntimeError):
    """The DeepSpeed async I/O op cannot be used here; the message says why, in a few words."""


def extensions_dir() -> Path:
    """Where torch JIT extensions are built: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions."""
    return Path(
        os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    )


def _build_dirs(name: str) -> list[Path]:
    """Where a JIT build of op ``name`` may be: under :func:`extensions_dir` itself (where
    this module and ``.ci/install-aio.sh`` build), or in torch's default per-Python folder
    (``py311_cpu``, ``py311_cu124``: where DeepSpeed builds by default)."""
    root = extensions_dir()
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return [root / name, root / f"{py}_{accel}" / name]


def built_op(name: str) -> Path | None:
    """The shared library of a finished JIT build of DeepSpeed op ``name`` (no build in
    progress), or None. Cheap: imports and compiles nothing."""
    for d in _build_dirs(name):
        if (d / f"{name}.so").is_file() and not (d / "lock").exists():
            return d / f"{name}.so"
    return None


def _installed_op() -> bool:
    """Whether DeepSpeed was installed with its async I/O op compiled in (DS_BUILD_AIO=1),
    found without importing DeepSpeed."""
    try:
        spec = importlib.util.find_spec("deepspeed")
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    return any((Path(spec.origin).parent / "ops" / "aio").glob("async_io_op*.so"))


def find_aio() -> str | None:
    """Where an async I/O op that loads without building is (a path, or "installed with
    DeepSpeed"), or None."""
    so, pin = built_op(OP_NAME), built_op("pin_memory")
    if so is not None and pin is not None:
        return str(so.parent)
    return "installed with DeepSpeed" if _installed_op() else None


def aio_prebuilt() -> bool:
    """True if :func:`find_aio` finds an op (cheap: imports nothing)."""
    return find_aio() is not None


def _load_built() -> Any:
    """The JIT-built op, loaded straight from its shared library: no DeepSpeed import, no
    compiler, no ninja (which would rebuild it if anything about the sources changed)."""
    so, pin = built_op(OP_NAME), built_op("pin_memory")
    assert so is not None and pin is not None
    if not torch.cuda.is_available():  # (the op imports DeepSpeed, which probes otherwise)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        # The op calls the pin manager compiled into pin_memory.so: its symbols first, global.
        ctypes.CDLL(str(pin), mode=ctypes.RTLD_GLOBAL)
        spec = importlib.util.spec_from_file_location(OP_NAME, so)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ImportError) as e:
        raise AioUnavailable(f"the op built at {so.parent} does not load ({e}); rebuild it: "
                             f"{BUILD_HINT}") from e
    return module


def load_aio_op(build: bool) -> Any:
    """Load DeepSpeed's async I/O op: one already built (:func:`find_aio`), or, if ``build``
    allows, build it first (logging that it may take minutes).

    Sets DS_ACCELERATOR=cpu when unset and CUDA is absent (else DeepSpeed probes for
    accelerators) and TORCH_EXTENSIONS_DIR to :func:`extensions_dir` so the build is found by
    later runs and by ``.ci/install-aio.sh``.

    Raises:
        AioUnavailable: deepspeed missing, libaio missing, op not built (and ``build`` false),
            or the build failed.
    """
    where = find_aio()
    if where is None and not build:
        raise AioUnavailable(f"op not built in {extensions_dir()}; {BUILD_HINT}")
    if OP_NAME in _loaded:  # (loaded once per process)
        return _loaded[OP_NAME]
    if where is not None and where != "installed with DeepSpeed":
        _loaded[OP_NAME] = _load_built()
        return _loaded[OP_NAME]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        builder_mod = importlib.import_module("deepspeed.ops.op_builder")
    except Exception as e:  # ImportError, or DeepSpeed failing on its own imports
        raise AioUnavailable(f"deepspeed not importable: {type(e).__name__}: {e}") from e
    builder = builder_mod.AsyncIOBuilder()
    if where is None:
        # DeepSpeed checks by compiling a test program against libaio: where it fails, say
        # so rather than show the compiler error of a doomed build.
        if not builder.is_compatible(verbose=False):
            raise AioUnavailable("libaio-dev missing: apt-get install -y libaio-dev")
        log.warning("harmony: building DeepSpeed's async I/O op into %s; this may take "
                    "several minutes (once: later runs load the build)", extensions_dir())
    try:
        _loaded[OP_NAME] = builder.load(verbose=False)
    except Exception as e:  # a compiler error, ninja missing, a link error...
        raise AioUnavailable(f"op build failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    return _loaded[OP_NAME]


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
