"""Blocking file I/O engines for the NVMe store: O_DIRECT (or plain buffered) pread/pwrite.

An engine moves one chunk between a file and memory and blocks until it is done; the store
runs engines on its worker threads and owns the chunking, staging and completion. The DeepSpeed
libaio engine in :mod:`swap.aio` has the same shape.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Protocol

import torch

from swap.aligned import aligned_empty, memview

O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class FileIO(Protocol):
    """One chunk of blocking I/O at a time, called from any of the store's worker threads."""

    name: str  # what NvmeStore.backend reports, e.g. "odirect" or "odirect(off: tmpfs)"
    direct: bool  # bypasses the page cache: buffer address, offset and length must be aligned
    open_flags: int  # added to os.open's flags for the store's own file descriptors

    def alloc(self, nbytes: int) -> torch.Tensor:
        """An aligned uint8 tensor of ``nbytes`` that :meth:`zero_copy` accepts."""
        ...

    def zero_copy(self, buf: torch.Tensor) -> bool:
        """Whether I/O may go straight to/from ``buf`` (else the store stages it)."""
        ...

    def pwrite(self, fd: int, path: str, buf: torch.Tensor, offset: int) -> None:
        """Write all of ``buf`` (uint8) at ``offset``; raise OSError on failure."""
        ...

    def pread(self, fd: int, path: str, buf: torch.Tensor, offset: int) -> None:
        """Fill all of ``buf`` (uint8) from ``offset``; raise OSError on failure."""
        ...

    def close(self) -> None:
        """Release threads or handles; called once no I/O is in flight."""
        ...


class PosixIO:
    """``os.pwritev``/``os.preadv`` on a file descriptor the store opened (with O_DIRECT or not).

    Python releases the GIL inside these calls, so several worker threads keep several
    requests in flight at the disk.
    """

    def __init__(self, name: str, direct: bool, alignment: int) -> None:
        self.name = name
        self.direct = direct
        self.open_flags = O_DIRECT if direct else 0
        self._alignment = alignment

    def alloc(self, nbytes: int) -> torch.Tensor:
        return aligned_empty(nbytes, self._alignment)

    def zero_copy(self, buf: torch.Tensor) -> bool:
        return not self.direct or buf.data_ptr() % self._alignment == 0

    def pwrite(self, fd: int, path: str, buf: torch.Tensor, offset: int) -> None:
        view = memview(buf)
        done = 0
        while done < len(view):  # after a short write, the next call writes the rest or fails
            n = os.pwritev(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"pwritev wrote nothing at offset {offset + done}", path)
            done += n

    def pread(self, fd: int, path: str, buf: torch.Tensor, offset: int) -> None:
        view = memview(buf)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"unexpected end of file at offset {offset + done}", path)
            done += n

    def close(self) -> None:
        return None


def fs_type(path: str | os.PathLike[str]) -> str:
    """The file system type holding ``path`` per /proc/mounts (``"unknown"`` if not found)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, fields[2]
    except OSError:
        pass
    return kind


def odirect_refusal(directory: Path, alignment: int) -> str | None:
    """Why O_DIRECT does not work in ``directory`` (e.g. ``"tmpfs"``), or None if it does.

    Probes with a real aligned write and read, since some file systems accept the flag at
    open() and refuse only the I/O.
    """
    if not O_DIRECT:
        return "no O_DIRECT on this OS"
    probe = directory / ".odirect-probe"
    buf = aligned_empty(alignment, alignment)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | O_DIRECT, 0o600)
        try:
            os.pwritev(fd, [memview(buf)], 0)
            os.preadv(fd, [memview(buf)], 0)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return fs_type(directory)
    finally:
        probe.unlink(missing_ok=True)
    return None


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
except (OSError, AttributeError):
    _libc = None


def reserve(fd: int, path: str, nbytes: int) -> None:
    """Give the file ``nbytes`` of size and, where the file system can, allocate its blocks now.

    Allocating up front makes a full disk fail here, before any byte of the request moves
    (libaio does not report the result of each write), and spares O_DIRECT writes the block
    allocation. Where fallocate is unsupported the file is only sized (sparse).

    Raises:
        OSError: ENOSPC/EDQUOT when the space is not there, or any other error of the call.
    """
    if _libc is not None and nbytes > 0:
        if _libc.fallocate(fd, 0, 0, nbytes) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), path)
    os.ftruncate(fd, nbytes)
