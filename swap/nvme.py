"""The NVMe tier's store: tensors as files in a private directory, read and written asynchronously.

Each request is cut into chunks of ``chunk_bytes`` at aligned file offsets; the store's worker
threads run the chunks through an I/O engine (DeepSpeed's libaio op, O_DIRECT
``pwritev``/``preadv``, or plain buffered I/O), so one large tensor keeps several requests in
flight at the disk and many small ones overlap. A chunk goes straight between the file and the
caller's tensor when that memory suits the engine (e.g. it came from :meth:`NvmeStore.allocate`);
otherwise it bounces through a bounded pool of aligned staging buffers, one per thread.

Every write goes to a new file: the key points at it from the moment the write is issued, and
the file it replaces is deleted once no request uses it. So a failed write never damages
another key, and a read that was issued before an overwrite still reads the old bytes.

    write(key, src)  caller thread: create file, reserve its blocks -> Handle
                     workers:       chunk 0 | chunk 1 | ... (stage if unaligned) -> done
    read(key, dst)   waits (off-thread) for a pending write of that key, then the same

``write_later(key, nbytes)`` makes the key known (and its file made) before its bytes exist,
for a GPU tensor still on its way to a host staging buffer; ``start(src)`` on the returned
:class:`PendingWrite` then runs the write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import torch

from swap.aio import AioIO, AioUnavailable, load_aio_op
from swap.aligned import StagingPool, as_bytes, check_alignment, copy_bytes, round_up
from swap.direct_io import FileIO, PosixIO, odirect_refusal, reserve
from swap.handle import Handle

log = logging.getLogger("harmony.swap")

BACKENDS = ("aio", "odirect", "buffered")  # best first
_DESCRIPTION = {
    "aio": "DeepSpeed async I/O",
    "odirect": "O_DIRECT threads",
    "buffered": "buffered I/O threads",
}
_DIR_PATTERN = re.compile(r"harmony-(\d+)-[A-Za-z0-9_]+")
_LOCK_NAME = ".lock"
MARKER = ".harmony-swap"  # in each swap directory: who made it (pid, start time, boot)


class NvmeIOError(OSError):
    """A read or write of the NVMe store failed.

    ``errno`` is the system's (e.g. ENOSPC); the message names the key, the file, the operation
    and the bytes, and says what to do. ``path`` is the file.
    """

    path: str


class NvmeStore:
    """Asynchronous tensor files under a private directory.

    Args:
        root: an existing, writable directory (ideally on an NVMe drive). The store works in a
            new subdirectory ``root/harmony-<pid>-<random>`` (mode 0700, files 0600) holding a
            marker file (:data:`MARKER`: its pid, the process's start time and the boot), and
            removes the subdirectories that dead runs left behind: only those whose marker
            names a process that has ended, never a directory without a valid marker. The
            directory goes on :meth:`close`, when the store is garbage-collected, or at a
            normal interpreter exit.
        backend: ``"auto"`` (the best that works), ``"aio"`` (DeepSpeed async I/O; builds the
            op if needed, 5-15 minutes), ``"odirect"`` or ``"buffered"``. A backend that does
            not work here degrades to the next one with a one-line warning saying why.
            ``"auto"`` never builds: it uses the aio op only if it is already built.
        threads: worker threads, i.e. chunks in flight at once.
        alignment: bytes; file sizes, offsets and direct-I/O buffers are multiples of it.
        chunk_bytes: the largest piece of a request one thread moves at a time; also the size
            of each staging buffer (``threads`` of them at most).

    Raises:
        ValueError: ``root`` not a path, empty, a file, missing or not writable, or a bad
            argument; the message names it and says what to do.

    Attributes:
        backend: what is in use: ``"aio"``, ``"odirect"``, ``"odirect(off: tmpfs)"`` (the file
            system refused O_DIRECT, so the page cache is used) or ``"buffered"``.
        directory: the private subdirectory.

    Example:
        >>> with NvmeStore("/mnt/nvme") as store:
        ...     w = torch.randn(1000)
        ...     store.write("pack0.W", w).wait()      # w must stay unchanged until then
        ...     out = torch.empty_like(w)
        ...     store.read("pack0.W", out).wait()
    """

    backend: str
    directory: Path

    def __init__(
        self,
        root: str | os.PathLike[str],
        backend: str = "auto",
        threads: int = 4,
        alignment: int = 4096,
        chunk_bytes: int = 8 << 20,
    ) -> None:
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"backend={backend!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}"
            )
        if threads < 1:
            raise ValueError(f"threads={threads} must be at least 1")
        check_alignment(alignment)
        if chunk_bytes < alignment or chunk_bytes % alignment:
            raise ValueError(
                f"chunk_bytes={chunk_bytes} must be a positive multiple of alignment={alignment}"
            )
        self.root = check_root(root)
        _remove_stale(self.root)
        self.directory = _make_private_dir(self.root)
        # Held for the store's life: another run's stale-directory sweep skips a locked directory
        # even when our pid means nothing to it (another pid namespace on the same disk).
        self._lock_fd = os.open(self.directory / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A store dropped without close(), or still open when the interpreter exits normally,
        # removes its directory all the same (after the worker threads are joined).
        self._finalizer = weakref.finalize(self, _remove_tree, self.directory, self._lock_fd,
                                           os.getpid())
        try:
            self._engine = _open_engine(backend, self.directory, alignment, chunk_bytes)
        except BaseException:
            self._remove_directory()
            raise
        self.backend = self._engine.name
        self._align = alignment if self._engine.direct else 1
        self._chunk = chunk_bytes
        self._pool = StagingPool(threads, chunk_bytes, self._engine.alloc)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="harmony-nvme")
        self._lock = threading.Lock()  # guards every field below
        self._files: dict[str, _File] = {}  # key -> its newest version
        self._failed: dict[str, str] = {}  # key -> why its last write failed (for KeyError)
        self._inflight: set[_Request] = set()
        self._unstarted: set[_Job] = set()  # writes made known by write_later, not started
        self._disk_bytes = 0
        self._seq = 0
        self._closed = False

    # ----------------------------------------------------------------------------- public API

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A page-aligned uint8 CPU tensor of exactly ``nbytes`` that reads and writes use in place.

        The memory is padded to the alignment behind the tensor's end, so a full request goes
        to disk without staging. With the aio backend it is page-locked memory of the op.
        View it as any dtype with ``t.view(dtype)``.

        Example:
            >>> buf = store.allocate(4 * 1000).view(torch.float32)
        """
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        return self._engine.alloc(round_up(nbytes, self._align))[:nbytes]

    def write(self, key: str, src: torch.Tensor) -> Handle:
        """Start writing ``src``'s bytes as ``key`` (replacing any earlier value).

        Ownership: ``src`` stays owned by the caller, who keeps it alive and unmodified until
        the handle is done; the store's worker threads read it (or copy it into staging) until
        then. Whoever needs the bytes durable, or ``src`` back, waits on the handle.

        Args:
            key: any string.
            src: a contiguous CPU tensor of any dtype and shape.

        Returns:
            A handle; ``wait()``/``synchronize()`` raise :class:`NvmeIOError` if the write
            failed, after which ``key`` is absent (earlier value gone, other keys intact).

        Raises:
            ValueError: ``src`` is not a contiguous CPU tensor, or the store is closed.
        """
        data = as_bytes(src)
        pending = self.write_later(key, data.numel())
        pending.start(data)
        return pending.handle

    def write_later(self, key: str, nbytes: int) -> PendingWrite:
        """Make ``key`` known now for a write of ``nbytes`` whose bytes come later.

        For a write whose source is not ready yet (a GPU tensor's bytes on their way to a host
        staging buffer): from this call on the key is in the store, a :meth:`read` of it waits
        for the write (and fails with its error), a :meth:`delete` takes effect once the write
        has ended (and skips its I/O if it has not started), and :meth:`close` waits for it.
        The caller then calls exactly one of :meth:`PendingWrite.start` (with the bytes) or
        :meth:`PendingWrite.fail` (the bytes will never come).

        Raises:
            ValueError: ``nbytes`` < 0, or the store is closed.

        Example:
            >>> pending = store.write_later("pack0.X", 4000)
            >>> "pack0.X" in store
            True
            >>> pending.start(torch.zeros(1000))            # later, on any thread
            >>> pending.handle.wait()
        """
        if nbytes < 0:
            raise ValueError(f"write_later({key!r}): nbytes={nbytes} must be >= 0")
        with self._lock:
            self._check_open()
            self._seq += 1
            name = f"{self._seq:06d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)[:48]}"
            f = _File(key, self.directory / name, nbytes, round_up(nbytes, self._align), users=1)
            old = self._files.get(key)
            self._files[key] = f
            self._failed.pop(key, None)
            if old is not None:
                self._retire(old)
            job = _Job("write", f, torch.empty(0, dtype=torch.uint8), self._finisher)
            f.write = job.request
            self._inflight.add(job.request)
            self._unstarted.add(job)
            self._disk_bytes += f.padded
        try:
            # Creating and reserving on the caller's thread is metadata only, and it makes a
            # full disk fail this request before any of its bytes move.
            job.fd = os.open(
                f.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | self._engine.open_flags, 0o600
            )
            os.fchmod(job.fd, 0o600)  # whatever the umask
            reserve(job.fd, str(f.path), f.padded)
        except OSError as e:
            self._fail_unstarted(job, self._io_error(job, 0, f.padded, e))
        return PendingWrite(self, job)

    def _start_pending(self, job: _Job, data: torch.Tensor) -> None:
        """:meth:`PendingWrite.start`: check the bytes, then run the write's chunks (none when
        the key was deleted before it started and no read waits for it)."""
        with self._lock:
            if job not in self._unstarted:
                if job.failed_early:  # (failed meanwhile: its handle says why)
                    return
                raise ValueError(f"the write of key {job.file.key!r} was started already; "
                                 "start a pending write once")
            if data.numel() != job.file.nbytes:
                raise ValueError(f"write of key {job.file.key!r}: {data.numel()} bytes given but "
                                 f"write_later was told {job.file.nbytes}; pass that many")
            self._unstarted.discard(job)
            skip = job.file.retired and job.file.users == 1  # deleted, and nobody reads it
        job.data = data
        if skip:
            job.request.expect(0)
        else:
            self._start(job)

    def _fail_unstarted(self, job: _Job, error: BaseException) -> None:
        """Complete a write that will never start with ``error`` (idempotent)."""
        with self._lock:
            if job not in self._unstarted:
                return
            self._unstarted.discard(job)
            job.failed_early = True
        job.request.fail(error)

    def read(self, key: str, dst: torch.Tensor) -> Handle:
        """Start reading ``key`` into ``dst``.

        If a write of ``key`` is still in flight, the read starts when it ends (and fails with
        its error if it failed), so issuing write then read without waiting is safe.

        Ownership: the store's worker threads write into ``dst`` until the handle is done;
        the caller keeps it alive and neither reads nor writes it before ``wait()``.

        Args:
            key: a key written earlier.
            dst: a contiguous CPU tensor with exactly as many bytes as were written
                (any dtype and shape).

        Returns:
            A handle; ``wait()``/``synchronize()`` raise :class:`NvmeIOError` on failure.

        Raises:
            KeyError: unknown key (or its last write failed; the message says so).
            ValueError: ``dst`` has another size, is not a contiguous CPU tensor, or the store
                is closed.
        """
        data = as_bytes(dst)
        with self._lock:
            self._check_open()
            f = self._lookup(key)
            if data.numel() != f.nbytes:
                raise ValueError(
                    f"read({key!r}): dst has {data.numel()} bytes but {f.nbytes} were written; "
                    f"pass a tensor of {f.nbytes} bytes"
                )
            f.users += 1
            job = _Job("read", f, data, self._finisher)
            self._inflight.add(job.request)
            pending = f.write

        def start() -> None:
            if pending is not None and pending.error is not None:
                job.request.fail(
                    NvmeIOError(
                        getattr(pending.error, "errno", None) or errno.EIO,
                        f"read of key {key!r} did not run: the write it follows failed "
                        f"({pending.error})",
                    )
                )
                return
            try:
                job.fd = os.open(f.path, os.O_RDONLY | self._engine.open_flags)
            except OSError as e:
                job.request.fail(self._io_error(job, 0, f.padded, e))
                return
            self._start(job)

        if pending is None:
            start()
        else:
            # Runs on the thread that finishes the write (or here, if it already has).
            pending.add_done_callback(start)
        return job.request

    def delete(self, key: str) -> None:
        """Forget ``key``; its file goes as soon as no in-flight request uses it.

        Raises:
            KeyError: unknown key.
        """
        with self._lock:
            self._check_open()
            f = self._lookup(key)
            del self._files[key]
            self._retire(f)

    def nbytes(self, key: str) -> int:
        """Bytes written as ``key`` (unpadded). Raises KeyError for an unknown key."""
        with self._lock:
            return self._lookup(key).nbytes

    def keys(self) -> list[str]:
        """The keys now stored (including those whose write is still in flight)."""
        with self._lock:
            return list(self._files)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._files

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    @property
    def used_bytes(self) -> int:
        """Bytes the store's files occupy on disk (padded to the alignment), including files
        being written and replaced files that a read still uses."""
        with self._lock:
            return self._disk_bytes

    def close(self) -> None:
        """Wait for in-flight I/O (ignoring its errors), then remove every file and the directory.

        Idempotent. Afterwards reads and writes raise ValueError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._inflight)
            unstarted = list(self._unstarted)
        for job in unstarted:  # their bytes will not come now
            self._fail_unstarted(job, ValueError(
                f"the NVMe store at {self.directory} was closed before the write of key "
                f"{job.file.key!r} started"))
        for request in pending:
            request.join()
        self._executor.shutdown(wait=True)
        self._engine.close()
        self._pool.clear()
        with self._lock:
            self._files.clear()
            self._disk_bytes = 0
        self._remove_directory()

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"NvmeStore({str(self.directory)!r}, backend={self.backend!r}, keys={len(self._files)})"
        )

    # ------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the NVMe store at {self.directory} is closed")

    def _lookup(self, key: str) -> _File:
        f = self._files.get(key)
        if f is None:
            why = self._failed.get(key)
            raise KeyError(
                f"{key!r}: its last write failed ({why})"
                if why
                else f"{key!r} is not in the NVMe store"
            )
        return f

    def _retire(self, f: _File) -> None:
        """Mark ``f`` superseded or deleted; unlink it now if nothing uses it. Lock held."""
        f.retired = True
        if f.users == 0 and not f.unlinked:
            f.unlinked = True
            self._disk_bytes -= f.padded
            f.path.unlink(missing_ok=True)

    def _start(self, job: _Job) -> None:
        """Hand the job's chunks to the workers (or finish it at once when it has none)."""
        offsets = range(0, job.file.padded, self._chunk)
        job.request.expect(len(offsets))
        for off in offsets:
            self._executor.submit(
                self._run_chunk, job, off, min(self._chunk, job.file.padded - off)
            )

    def _run_chunk(self, job: _Job, off: int, length: int) -> None:
        """One chunk, on a worker thread. The caller's tensor (``job.data``) is read or written
        only inside [off, off + length); staging buffers are this thread's until released."""
        err: BaseException | None = None
        try:
            f, data, engine = job.file, job.data, self._engine
            path = str(f.path)
            inside = off + length <= data.numel()
            if inside and engine.zero_copy(data[off : off + length]):
                io = engine.pwrite if job.op == "write" else engine.pread
                io(job.fd, path, data[off : off + length], off)
            else:
                used = min(length, data.numel() - off)  # the caller's bytes; the rest is padding
                with self._pool.borrow() as stage:
                    buf = stage[:length]
                    if job.op == "write":
                        copy_bytes(buf[:used], data[off : off + used])
                        buf[used:].zero_()  # never write stale staging bytes to disk
                        engine.pwrite(job.fd, path, buf, off)
                    else:
                        engine.pread(job.fd, path, buf, off)
                        copy_bytes(data[off : off + used], buf[:used])
        except OSError as e:
            err = self._io_error(job, off, length, e)
        except BaseException as e:  # anything else still completes the request, with its error
            err = e
        job.request.part_done(err)

    def _finisher(self, job: _Job) -> Callable[[BaseException | None], None]:
        def finish(error: BaseException | None) -> None:
            # Runs once per request, on the thread that completed its last chunk.
            close_error = None
            if job.fd >= 0:
                try:
                    os.close(job.fd)
                except OSError as e:  # some file systems report a lost write only here
                    close_error = self._io_error(job, 0, job.file.padded, e)
                job.fd = -1
            error = error or close_error
            with self._lock:
                f = job.file
                f.users -= 1
                if job.op == "write":
                    f.write = None
                    if error is not None:
                        if self._files.get(f.key) is f:
                            del self._files[f.key]
                            self._failed[f.key] = str(error)
                        f.retired = True
                if f.retired:
                    self._retire(f)
                self._inflight.discard(job.request)
            if close_error is not None and error is close_error:
                raise close_error  # the request completes with it

        return finish

    def _io_error(self, job: _Job, off: int, length: int, e: OSError) -> NvmeIOError:
        f = job.file
        code = e.errno or errno.EIO
        if code in (errno.ENOSPC, errno.EDQUOT):
            todo = f"free space in {self.root} (df -h {self.root}) or pick another nvme_dir"
        elif code == errno.EIO:
            todo = (
                "the device reported an I/O error: check dmesg and the drive's health, "
                "or pick another nvme_dir"
            )
        else:
            todo = f"check the file system at {self.root}, or pick another nvme_dir"
        direction = "to" if job.op == "write" else "from"
        err = NvmeIOError(
            code,
            f"NVMe store {job.op} of key {f.key!r} ({f.nbytes} bytes; {length} bytes at offset "
            f"{off}) {direction} {f.path} failed: {e.strerror or e}; {todo}",
        )
        err.path = str(f.path)
        return err

    def _remove_directory(self) -> None:
        self._finalizer()  # (once: a second call does nothing)


class PendingWrite:
    """A write made known with :meth:`NvmeStore.write_later`, whose bytes come later.

    ``handle`` is done when the write has ended (it raises the write's error). Call exactly
    one of :meth:`start` and :meth:`fail`, from any thread.
    """

    def __init__(self, store: NvmeStore, job: _Job) -> None:
        self._store, self._job = store, job
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
            self._store._start_pending(self._job, as_bytes(src))
        return self.handle

    def fail(self, error: BaseException) -> None:
        """The bytes will never come (e.g. the copy producing them failed): the write ends
        with ``error``, the key is forgotten and reads waiting for it raise."""
        self._store._fail_unstarted(self._job, error)


@dataclass(eq=False)
class _File:
    """One version of a key on disk."""

    key: str
    path: Path
    nbytes: int  # as written by the caller
    padded: int  # on disk
    users: int = 0  # requests in flight on this file (its write, reads)
    retired: bool = False  # replaced, deleted or failed: unlink once users == 0
    unlinked: bool = False
    write: _Request | None = None  # the write filling it, while in flight


class _Job:
    """One read or write: what it moves, the fd it uses (owned by the job), its completion."""

    def __init__(
        self,
        op: Literal["read", "write"],
        file: _File,
        data: torch.Tensor,
        finisher: Callable[[_Job], Callable[[BaseException | None], None]],
    ) -> None:
        self.op = op
        self.file = file
        self.data = data
        self.fd = -1
        self.failed_early = False  # a pending write that ended before it started
        self.request = _Request(finisher(self))


class _Request:
    """The handle of one store request: done when its last chunk is (a :class:`Handle`)."""

    device: torch.device | None = None  # host work: ``wait`` means finished

    def __init__(self, finish: Callable[[BaseException | None], None]) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._left = -1  # chunks not yet done; -1 until the chunks are known
        self._callbacks: list[Callable[[], None]] = []
        self._finish = finish
        self.error: BaseException | None = None

    def expect(self, parts: int) -> None:
        self._left = parts
        if parts == 0:
            self._complete()

    def part_done(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self._complete()

    def fail(self, error: BaseException) -> None:
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
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()
        if self.error is not None:
            raise self.error

    def synchronize(self) -> None:
        self.wait()


def _finished(error: BaseException | None) -> None:
    """A completed request's finisher: it has run already."""


def check_root(root: object) -> Path:
    """``root`` as a Path if it can hold the store's directory: a str or PathLike naming an
    existing, writable directory.

    Raises:
        ValueError: naming the value and what to give instead.
    """
    text = os.fspath(root) if isinstance(root, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise ValueError(f"nvme_dir={root!r} is not a path; give a directory (a str or "
                         "pathlib.Path), or None for no NVMe tier")
    if not text.strip():
        raise ValueError(f"nvme_dir={root!r} is empty (an unset environment variable?); give "
                         "the directory for the swap files, or None for no NVMe tier")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"nvme_dir {text!r} is a file, not a directory; give the directory "
                         f"that should hold harmony's swap files (such as {str(path.parent)!r})")
    if not path.is_dir():
        raise ValueError(
            f"nvme_dir {text!r} does not exist; create it (mkdir -p {path}) or pick another "
            "nvme_dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(
            f"nvme_dir {text!r} is not writable by this process; fix its permissions "
            f"(or remount it read-write) or pick another nvme_dir"
        )
    return path


def _make_private_dir(root: Path) -> Path:
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"harmony-{os.getpid()}-", dir=root))
        directory.chmod(0o700)
        # The marker proves to a later sweep that harmony made this directory and for whom.
        fd = os.open(directory / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps({"harmony": "swap", "pid": os.getpid(),
                                     "start": _process_start(os.getpid()),
                                     "boot": _boot_id()}).encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise ValueError(
            f"cannot create a swap directory in nvme_dir {str(root)!r}: {e.strerror}; make it "
            f"writable (permissions, or remount read-write) or pick another nvme_dir"
        ) from e
    return directory


def _remove_tree(directory: Path, lock_fd: int, owner: int) -> None:
    """Close the lock and remove the store's directory, in the process that made it only (a
    forked child, say a data-loader worker, that drops its copy of the store leaves it)."""
    with contextlib.suppress(OSError):
        os.close(lock_fd)
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _boot_id() -> str | None:
    """This boot's id (pids and start times restart with each boot); None where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, as text (so a reused pid is told apart from the one a
    marker names): ``/proc/<pid>/stat``'s start time, else psutil's; None where neither
    can tell (then only the pid is compared)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime, clock ticks)
    except (OSError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time()!r}"
    except Exception:  # gone, or not ours to ask about
        return None


def _marker(directory: Path) -> dict[str, object] | None:
    """The owner a swap directory's marker names, if it is a valid marker: a regular file
    (not a symlink) of ours holding harmony's JSON; else None (never swept)."""
    path = directory / MARKER
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size > 4096:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("harmony") != "swap" \
            or not isinstance(data.get("pid"), int):
        return None
    return data


def _owner_gone(marker: dict[str, object]) -> bool:
    """Whether the process a marker names has ended (a reboot since, its pid gone, or the pid
    now another process's, told by its start time)."""
    pid = marker["pid"]
    assert isinstance(pid, int)
    boot = _boot_id()
    if marker.get("boot") is not None and boot is not None and marker["boot"] != boot:
        return True
    if not _pid_alive(pid):
        return True
    start = _process_start(pid)
    if marker.get("start") is None or start is None:
        global _WARNED_NO_START
        if not _WARNED_NO_START:
            _WARNED_NO_START = True
            log.warning("harmony: cannot read process start times here (no /proc, no psutil: "
                        "pip install psutil); a swap directory whose pid was reused by another "
                        "process is kept until that process ends")
        return False
    return start != marker["start"]


_WARNED_NO_START = False


def _remove_stale(root: Path) -> None:
    """Remove swap directories harmony made whose run is gone: named ``harmony-<pid>-*``,
    holding a valid marker for that pid whose owner has ended, and not locked by a live
    store. A directory without such a marker is never touched."""
    removed: list[str] = []
    for entry in os.scandir(root):
        match = _DIR_PATTERN.fullmatch(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        directory = Path(entry.path)
        marker = _marker(directory)
        if marker is None or marker["pid"] != int(match.group(1)):
            continue
        if not _owner_gone(marker) or _locked(directory / _LOCK_NAME):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        log.warning(
            "harmony: removed %d swap director%s of dead runs under %s: %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            root,
            ", ".join(sorted(removed)),
        )


def _locked(lock_path: Path) -> bool:
    """Whether a live store holds ``lock_path`` (False if it is missing)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _open_engine(backend: str, directory: Path, alignment: int, chunk_bytes: int) -> FileIO:
    """The first backend from ``backend`` on (best first) that works in ``directory``.

    Falling back logs one line saying why the preferred one is out.
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
