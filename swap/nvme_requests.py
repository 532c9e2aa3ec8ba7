"""The NVMe store's requests: one read or write of a key, its file, and how it ends.

A :class:`Job` is one read or write of a :class:`FileVersion` (one version of a key on disk);
its :class:`Request` is the caller's handle, done when the last of the job's chunks is, and
failing with an :class:`NvmeIOError` that :func:`io_error` words. A :class:`PendingWrite` is a
write made known before its bytes exist (:meth:`swap.nvme.NvmeStore.write_later`).

    NvmeStore.write/read -> Job(op, FileVersion, tensor) -> Request (a Handle)
    worker threads       -> request.part_done(error) per chunk -> finisher, callbacks, done
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from swap.aligned import as_bytes
from swap.handle import Handle


class NvmeIOError(OSError):
    """A read or write of the NVMe store failed.

    ``errno`` is the system's (e.g. ENOSPC); the message names the key, the file, the operation
    and the bytes, and says what to do. ``path`` is the file.
    """

    path: str


def io_error(job: Job, root: Path, off: int, length: int, e: OSError) -> NvmeIOError:
    """The error a failed read or write of ``job`` raises: its key, file, operation and bytes,
    the system's reason and what to do about it.

    Args:
        job: the request that failed.
        root: the store's ``nvme_dir`` (named in what to do).
        off: where in the file the failed piece starts.
        length: its bytes.
        e: the system's error.

    Returns:
        An :class:`NvmeIOError` with ``e``'s errno (EIO if it has none) and ``path`` set.

    Example:
        >>> io_error(job, Path("/mnt/nvme"), 0, 4096, OSError(errno.ENOSPC, "No space"))
    """
    f = job.file
    code = e.errno or errno.EIO
    if code in (errno.ENOSPC, errno.EDQUOT):
        todo = f"free space in {root} (df -h {root}) or pick another nvme_dir"
    elif code == errno.EIO:
        todo = (
            "the device reported an I/O error: check dmesg and the drive's health, "
            "or pick another nvme_dir"
        )
    else:
        todo = f"check the file system at {root}, or pick another nvme_dir"
    direction = "to" if job.op == "write" else "from"
    err = NvmeIOError(
        code,
        f"NVMe store {job.op} of key {f.key!r} ({f.nbytes} bytes; {length} bytes at offset "
        f"{off}) {direction} {f.path} failed: {e.strerror or e}; {todo}",
    )
    err.path = str(f.path)
    return err


class PendingWrite:
    """A write made known with :meth:`swap.nvme.NvmeStore.write_later`, whose bytes come later.

    ``handle`` is done when the write has ended (it raises the write's error). Call exactly
    one of :meth:`start` and :meth:`fail`, from any thread.

    Args:
        job: the write.
        start: the store's way to run the write once its bytes are here (it checks them).
        fail: the store's way to end a write that never started with an error.

    Example:
        >>> pending = store.write_later("pack0.X", 4000)
        >>> pending.start(torch.zeros(1000)).wait()
    """

    def __init__(
        self,
        job: Job,
        start: Callable[[Job, torch.Tensor], None],
        fail: Callable[[Job, BaseException], None],
    ) -> None:
        self._job, self._start, self._fail = job, start, fail
        self.handle: Handle = job.request

    def start(self, src: torch.Tensor) -> Handle:
        """Write ``src`` (a contiguous CPU tensor of exactly the announced bytes), kept alive
        and unchanged by the caller until :attr:`handle` is done; returns :attr:`handle`.
        A write that failed already (say, the disk was full when the file was made) does
        nothing here: its handle raises that error.

        Raises:
            ValueError: ``src`` has another size or is not a contiguous CPU tensor, or this
                write was started already.
        """
        if not self._job.request.done():
            self._start(self._job, as_bytes(src))
        return self.handle

    def fail(self, error: BaseException) -> None:
        """The bytes will never come (e.g. the copy producing them failed): the write ends
        with ``error``, the key is forgotten and reads waiting for it raise."""
        self._fail(self._job, error)


@dataclass(eq=False)
class FileVersion:
    """One version of a key on disk (the store's lock guards its fields)."""

    key: str
    path: Path
    nbytes: int  # as written by the caller
    padded: int  # on disk
    users: int = 0  # requests in flight on this file (its write, reads)
    retired: bool = False  # replaced, deleted or failed: unlink once users == 0
    unlinked: bool = False
    write: Request | None = None  # the write filling it, while in flight


class Job:
    """One read or write: what it moves, the fd it uses (owned by the job), its completion.

    Args:
        op: ``"read"`` or ``"write"``.
        file: the version of the key it reads or fills.
        data: the caller's bytes (uint8; empty until a pending write starts).
        finisher: makes the function that runs once when the request ends (closes the fd,
            settles the file's books), given the job.

    Example:
        >>> job = Job("read", file, dst, store._finisher)
    """

    def __init__(
        self,
        op: Literal["read", "write"],
        file: FileVersion,
        data: torch.Tensor,
        finisher: Callable[[Job], Callable[[BaseException | None], None]],
    ) -> None:
        self.op = op
        self.file = file
        self.data = data
        self.fd = -1
        self.failed_early = False  # a pending write that ended before it started
        self.request = Request(finisher(self))


class Request:
    """The handle of one store request: done when its last chunk is (a :class:`Handle`).

    Args:
        finish: runs once, on the completing thread, with the request's error (or None);
            what it raises becomes the request's error if it has none.

    Example:
        >>> request = Request(lambda error: None)
        >>> request.expect(0)       # no chunks: done at once
        >>> request.wait()
    """

    device: torch.device | None = None  # host work: ``wait`` means finished

    def __init__(self, finish: Callable[[BaseException | None], None]) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._left = -1  # chunks not yet done; -1 until the chunks are known
        self._callbacks: list[Callable[[], None]] = []
        self._finish = finish
        self.error: BaseException | None = None

    def expect(self, parts: int) -> None:
        """The request has ``parts`` chunks (none: it completes now)."""
        self._left = parts
        if parts == 0:
            self._complete()

    def part_done(self, error: BaseException | None) -> None:
        """One chunk ended (with ``error``, or None); the last completes the request."""
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self._complete()

    def fail(self, error: BaseException) -> None:
        """Complete now with ``error`` (a request none of whose chunks will run)."""
        self.error = error
        self._complete()

    def _complete(self) -> None:
        try:
            self._finish(self.error)
        except BaseException as e:  # e.g. close() of the fd failed: still complete, report it
            self.error = self.error or e
        # The finisher holds the job, which holds this request and the caller's tensor: a
        # reference cycle that would keep the tensor's memory until the garbage collector
        # runs (a pack's weights per request). Dropping it frees the tensor with its last user.
        self._finish = _finished
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` when done: on the completing thread, or now if already done."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def join(self) -> None:
        """Block until done, without raising the request's error."""
        self._event.wait()

    def done(self) -> bool:
        """Whether the request has completed."""
        return self._event.is_set()

    def wait(self) -> None:
        """Block until done; raise the request's error if it failed."""
        self._event.wait()
        if self.error is not None:
            raise self.error

    def synchronize(self) -> None:
        """The same as :meth:`wait` (host work has nothing else to wait for)."""
        self.wait()


def _finished(error: BaseException | None) -> None:
    """A completed request's finisher: it has run already."""

