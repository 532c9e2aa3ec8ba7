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

The requests live in :mod:`swap.nvme_requests`, the choice of I/O engine in
:mod:`swap.nvme_backend`, and the directory's making, locking and sweeping in :mod:`swap.swap_dirs`.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import torch

from swap.aligned import StagingPool, as_bytes, check_alignment, copy_bytes, round_up
from swap.direct_io import reserve
from swap.handle import Handle
from swap.nvme_backend import BACKENDS, open_engine
from swap.nvme_requests import FileVersion, Job, NvmeIOError, PendingWrite, Request, io_error
from swap.swap_dirs import (
    MARKER,
    check_root,
    lock_dir,
    make_private_dir,
    remove_stale,
    remove_tree,
)

# What other modules import from here; the names defined elsewhere live in swap.nvme_backend,
# swap.nvme_requests and swap.swap_dirs.
__all__ = ["BACKENDS", "MARKER", "NvmeIOError", "NvmeStore", "PendingWrite", "check_root"]


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
        remove_stale(self.root)
        self.directory = make_private_dir(self.root)
        # Held for the store's life: another run's stale-directory sweep skips a locked directory
        # even when our pid means nothing to it (another pid namespace on the same disk).
        self._lock_fd = lock_dir(self.directory)
        # A store dropped without close(), or still open when the interpreter exits normally,
        # removes its directory all the same (after the worker threads are joined).
        self._finalizer = weakref.finalize(self, remove_tree, self.directory, self._lock_fd,
                                           os.getpid())
        try:
            self._engine = open_engine(backend, self.directory, alignment, chunk_bytes)
        except BaseException:
            self._remove_directory()
            raise
        self.backend = self._engine.name
        self._align = alignment if self._engine.direct else 1
        self._chunk = chunk_bytes
        self._pool = StagingPool(threads, chunk_bytes, self._engine.alloc)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="harmony-nvme")
        self._lock = threading.Lock()  # guards every field below
        self._files: dict[str, FileVersion] = {}  # key -> its newest version
        self._failed: dict[str, str] = {}  # key -> why its last write failed (for KeyError)
        self._inflight: set[Request] = set()
        self._unstarted: set[Job] = set()  # writes made known by write_later, not started
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
            f = FileVersion(key, self.directory / name, nbytes, round_up(nbytes, self._align),
                            users=1)
            old = self._files.get(key)
            self._files[key] = f
            self._failed.pop(key, None)
            if old is not None:
                self._retire(old)
            job = Job("write", f, torch.empty(0, dtype=torch.uint8), self._finisher)
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
            self._fail_unstarted(job, io_error(job, self.root, 0, f.padded, e))
        return PendingWrite(job, self._start_pending, self._fail_unstarted)

    def _start_pending(self, job: Job, data: torch.Tensor) -> None:
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

    def _fail_unstarted(self, job: Job, error: BaseException) -> None:
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
            job = Job("read", f, data, self._finisher)
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
                job.request.fail(io_error(job, self.root, 0, f.padded, e))
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

    def _lookup(self, key: str) -> FileVersion:
        f = self._files.get(key)
        if f is None:
            why = self._failed.get(key)
            raise KeyError(
                f"{key!r}: its last write failed ({why})"
                if why
                else f"{key!r} is not in the NVMe store"
            )
        return f

    def _retire(self, f: FileVersion) -> None:
        """Mark ``f`` superseded or deleted; unlink it now if nothing uses it. Lock held."""
        f.retired = True
        if f.users == 0 and not f.unlinked:
            f.unlinked = True
            self._disk_bytes -= f.padded
            f.path.unlink(missing_ok=True)

    def _start(self, job: Job) -> None:
        """Hand the job's chunks to the workers (or finish it at once when it has none)."""
        offsets = range(0, job.file.padded, self._chunk)
        job.request.expect(len(offsets))
        for off in offsets:
            self._executor.submit(
                self._run_chunk, job, off, min(self._chunk, job.file.padded - off)
            )

    def _run_chunk(self, job: Job, off: int, length: int) -> None:
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
            err = io_error(job, self.root, off, length, e)
        except BaseException as e:  # anything else still completes the request, with its error
            err = e
        job.request.part_done(err)

    def _finisher(self, job: Job) -> Callable[[BaseException | None], None]:
        def finish(error: BaseException | None) -> None:
            # Runs once per request, on the thread that completed its last chunk.
            close_error = None
            if job.fd >= 0:
                try:
                    os.close(job.fd)
                except OSError as e:  # some file systems report a lost write only here
                    close_error = io_error(job, self.root, 0, job.file.padded, e)
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

    def _remove_directory(self) -> None:
        self._finalizer()  # (once: a second call does nothing)

