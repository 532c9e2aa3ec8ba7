"""Which file I/O engine the NVMe store uses: the best of its backends that works here.

The backends, best first: DeepSpeed's libaio op (:mod:`swap.aio`), O_DIRECT ``pwritev``/
``preadv`` threads and buffered I/O threads (:mod:`swap.direct_io`). :func:`open_engine` tries
them from the one asked for on, in the store's own directory: the aio op must load (``"auto"``
never builds it) and pass a write-and-read-back self-test, and O_DIRECT must be accepted by
the file system (a tmpfs refuses it: then the page cache is used under the name
``"odirect(off: tmpfs)"``). Falling back logs one line saying why the faster one is out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from swap.aio import AioIO, AioUnavailable, load_aio_op
from swap.direct_io import FileIO, PosixIO, odirect_refusal, reserve

log = logging.getLogger("harmony.swap")

BACKENDS = ("aio", "odirect", "buffered")  # best first
_DESCRIPTION = {
    "aio": "DeepSpeed async I/O",
    "odirect": "O_DIRECT threads",
    "buffered": "buffered I/O threads",
}


def open_engine(backend: str, directory: Path, alignment: int, chunk_bytes: int) -> FileIO:
    """The first backend from ``backend`` on (best first) that works in ``directory``.

    Falling back logs one line saying why the preferred one is out.

    Args:
        backend: ``"auto"`` or one of :data:`BACKENDS` (``"aio"`` by name may build the op).
        directory: where the store's files go (its test block is written there).
        alignment: bytes; direct I/O's buffers, offsets and lengths are multiples of it.
        chunk_bytes: the largest piece of one request (the aio op's queue is sized by it).

    Returns:
        The engine; its ``name`` is what :attr:`swap.nvme.NvmeStore.backend` reports.

    Raises:
        ValueError: a test block cannot be written in ``directory`` (a full disk, say).

    Example:
        >>> engine = open_engine("auto", directory, 4096, 8 << 20)
        >>> engine.name
        'odirect'
    """
    try:
        refusal = odirect_refusal(directory, alignment)
    except OSError as e:
        raise ValueError(
            f"cannot write a test block in nvme_dir {str(directory.parent)!r}: {e.strerror}; "
            f"free space there or pick another nvme_dir"
        ) from e
    reasons: list[str] = []
    engine: FileIO | None = None
    for name in BACKENDS[0 if backend == "auto" else BACKENDS.index(backend) :]:
        if name == "aio":
            if refusal is not None:
                reasons.append(f"DeepSpeed async I/O unavailable (O_DIRECT refused by {refusal})")
                continue
            try:
                engine = _aio_engine(directory, alignment, chunk_bytes, build=backend == "aio")
            except AioUnavailable as e:
                reasons.append(f"DeepSpeed async I/O unavailable ({e})")
                continue
        elif name == "odirect" and refusal is None:
            engine = PosixIO("odirect", direct=True, alignment=alignment)
        elif name == "odirect":
            reasons.append(f"O_DIRECT refused by {refusal} at {directory.parent}")
            engine = PosixIO(f"odirect(off: {refusal})", direct=False, alignment=alignment)
        else:
            engine = PosixIO("buffered", direct=False, alignment=alignment)
        break
    assert engine is not None  # the loop always ends on a PosixIO
    using = _DESCRIPTION[engine.name] if engine.direct else "buffered I/O threads"
    if reasons:  # one line: which backend, and why not a faster one (how to get it)
        log.warning("harmony NVMe store: %s: using %s", "; ".join(reasons), using)
    else:
        log.info("harmony NVMe store: using %s", using)
    return engine


def _aio_engine(directory: Path, alignment: int, chunk_bytes: int, build: bool) -> AioIO:
    block = min(chunk_bytes, 1 << 20)
    engine = AioIO(load_aio_op(build), block, max(1, chunk_bytes // block), alignment)
    _selftest(engine, directory, alignment)
    return engine


def _selftest(engine: AioIO, directory: Path, alignment: int) -> None:
    """Write and read back one block, so a broken op degrades now rather than corrupting later."""
    probe = directory / ".aio-probe"
    out = engine.alloc(alignment)
    out.copy_(torch.arange(alignment, dtype=torch.int64).to(torch.uint8))
    back = engine.alloc(alignment)
    back.zero_()
    fd = os.open(probe, os.O_CREAT | os.O_RDWR | engine.open_flags, 0o600)
    try:
        reserve(fd, str(probe), alignment)
        engine.pwrite(fd, str(probe), out, 0)
        engine.pread(fd, str(probe), back, 0)
    except OSError as e:
        raise AioUnavailable(f"self-test failed: {e}") from e
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    if not torch.equal(out, back):
        raise AioUnavailable("self-test read back different bytes")
