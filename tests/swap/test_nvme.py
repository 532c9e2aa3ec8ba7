"""The NVMe store (swap/nvme.py) and its helpers: bytes, files, permissions, failures.

Every backend that works here runs the same round trips; one that does not is skipped with the
reason. The aio backend runs only when DeepSpeed's op is already built (``.ci/install-aio.sh``)
or HARMONY_TEST_AIO=1 asks for it (then it may build, 5-15 minutes); HARMONY_TEST_AIO=0
skips it.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import random
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import swap.nvme as nvme
import swap.nvme_backend as nvme_backend
import swap.swap_dirs as swap_dirs
from swap.aio import AioUnavailable, aio_prebuilt, load_aio_op
from swap.aligned import StagingPool, aligned_empty, as_bytes, round_up
from swap.nvme import NvmeIOError, NvmeStore
from tests.fs import tmpfs

SIZES = [0, 1, 3, 4097, (1 << 20) + 5]  # elements; with uint8 these are the byte counts
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
SMALL_CHUNK = 64 << 10  # so a 1 MiB tensor is 17 chunks spread over the threads


def aio_skip_reason() -> str | None:
    forced = os.environ.get("HARMONY_TEST_AIO")
    if forced == "0":
        return "HARMONY_TEST_AIO=0"
    if forced == "1":
        return None
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (.ci/install-aio.sh installs it)"
    if not aio_prebuilt():
        return (
            "DeepSpeed async I/O op not built (run .ci/install-aio.sh, or set "
            "HARMONY_TEST_AIO=1 to build it here, 5-15 minutes)"
        )
    return None


BACKENDS = [
    pytest.param(
        "aio",
        marks=pytest.mark.skipif(aio_skip_reason() is not None, reason=str(aio_skip_reason())),
    ),
    "odirect",
    "buffered",
]


def open_store(root: Path, backend: str, **kwargs: int) -> NvmeStore:
    """A store that really uses ``backend``: a silent fallback would make its tests meaningless."""
    store = NvmeStore(root, backend=backend, **kwargs)
    if store.backend != backend:
        store.close()
        if backend != "buffered" and store.backend.startswith("odirect(off"):
            pytest.skip(f"this file system refuses O_DIRECT: {store.backend}")
        pytest.fail(f"asked for backend {backend!r} but got {store.backend!r}")
    return store


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NvmeStore]:
    s = open_store(tmp_path, request.param, threads=4, chunk_bytes=SMALL_CHUNK)
    yield s
    s.close()


def random_tensor(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs with payloads included) for floats; 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_bit_for_bit(store: NvmeStore, dtype: torch.dtype) -> None:
    for i, n in enumerate(SIZES):
        src = random_tensor(n, dtype, seed=i)
        store.write(f"t{n}", src).wait()
        assert store.nbytes(f"t{n}") == src.numel() * src.element_size()
        dst = torch.empty_like(src)
        as_bytes(dst).fill_(0xA5)  # so bytes the read misses cannot match by luck
        store.read(f"t{n}", dst).wait()
        assert same_bits(src, dst), f"{dtype} x {n} differs after the round trip"
        # The same through allocate()d memory: aligned start, odd end, no staging but the tail.
        nbytes = src.numel() * src.element_size()
        src2 = store.allocate(nbytes).view(dtype)
        src2.copy_(src)
        store.write(f"a{n}", src2).wait()
        dst2 = store.allocate(nbytes).view(dtype)
        as_bytes(dst2).fill_(0x5A)
        store.read(f"a{n}", dst2).wait()
        assert same_bits(src, dst2), f"{dtype} x {n} via allocate() differs after the round trip"


def test_shapes_dtypes_and_unaligned_views(store: NvmeStore) -> None:
    base = random_tensor(3 * 5 * 7 + 1, torch.float32, seed=7)
    src = base[1:].view(3, 5, 7)  # data_ptr 4 bytes past an allocation: never page-aligned
    store.write("x", src).wait()
    out_base = torch.zeros(3 * 5 * 7 + 3)
    dst = out_base[3:].view(3, 5, 7)
    store.read("x", dst).wait()
    assert same_bits(src, dst)
    assert torch.equal(out_base[:3], torch.zeros(3)), "bytes before dst were touched"
    # Same bytes, another dtype: the store moves bytes, not elements.
    as_u8 = torch.empty(src.numel() * 4, dtype=torch.uint8)
    store.read("x", as_u8).wait()
    assert torch.equal(as_u8, as_bytes(src))


def test_many_concurrent_requests(store: NvmeStore) -> None:
    rng = random.Random(1)
    sizes = [rng.choice([0, 1, 3, 511, 4096, 4097, 70_000, 300_001]) for _ in range(120)]
    sources = {f"k{i}": random_tensor(n, torch.uint8, seed=i) for i, n in enumerate(sizes)}
    writes = [store.write(k, v) for k, v in sources.items()]  # all in flight at once
    # Reads issued before their writes are waited for start after them, so see the new bytes.
    outs = {k: torch.empty_like(v) for k, v in sources.items()}
    reads = [store.read(k, outs[k]) for k in sources]
    for h in writes + reads:
        h.wait()
        assert h.done()
    for k, v in sources.items():
        assert torch.equal(outs[k], v), k
    assert sorted(store.keys()) == sorted(sources)


def test_concurrent_writers_from_threads(store: NvmeStore) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(10):
                src = random_tensor(10_000 + 97 * i, torch.int64, seed=100 * t + i)
                store.write(f"{t}/{i}", src).wait()
                dst = torch.empty_like(src)
                store.read(f"{t}/{i}", dst).wait()
                assert torch.equal(src, dst)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def test_allocated_buffers_skip_staging(store: NvmeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 3 * SMALL_CHUNK  # whole chunks: nothing to pad, so no chunk needs a staging buffer
    src = store.allocate(n)
    assert src.numel() == n and src.dtype == torch.uint8 and src.data_ptr() % 4096 == 0
    src.copy_(random_tensor(n, torch.uint8))
    dst = store.allocate(n)
    borrowed: list[int] = []
    real = StagingPool.acquire

    def counting(self: StagingPool) -> torch.Tensor:
        borrowed.append(1)
        return real(self)

    monkeypatch.setattr(StagingPool, "acquire", counting)
    store.write("a", src).wait()
    store.read("a", dst).wait()
    assert torch.equal(src, dst)
    assert not borrowed, "allocate()d buffers were staged"
    store.write("b", torch.ones(5)).wait()  # a fresh torch tensor is not page-aligned
    if store.backend != "buffered":
        assert borrowed, "an unaligned tensor went to O_DIRECT I/O without staging"


def test_allocate_odd_sizes_and_views(store: NvmeStore) -> None:
    for n in (0, 1, 4097):
        buf = store.allocate(n)
        assert buf.numel() == n and buf.dtype == torch.uint8
    f = store.allocate(4 * 1001).view(torch.float32)
    f.copy_(torch.arange(1001, dtype=torch.float32))
    store.write("f", f).wait()
    back = torch.empty(1001)
    store.read("f", back).wait()
    assert torch.equal(back, torch.arange(1001, dtype=torch.float32))


def test_overwrite_delete_and_sizes(store: NvmeStore) -> None:
    a = random_tensor(10_000, torch.uint8, seed=1)
    store.write("k", a).wait()
    assert store.used_bytes >= 10_000
    # A read in flight keeps the old bytes even when the key is overwritten right after.
    old = torch.empty_like(a)
    r = store.read("k", old)
    b = random_tensor(123, torch.uint8, seed=2)
    w = store.write("k", b)
    r.wait()
    w.wait()
    assert torch.equal(old, a)
    assert store.nbytes("k") == 123
    new = torch.empty(123, dtype=torch.uint8)
    store.read("k", new).wait()
    assert torch.equal(new, b)
    files = [p for p in store.directory.iterdir() if not p.name.startswith(".")]
    assert len(files) == 1, f"the replaced file was not removed: {files}"
    assert store.used_bytes == round_up(123, store._align)
    store.delete("k")
    assert "k" not in store and store.keys() == [] and store.used_bytes == 0
    assert [p for p in store.directory.iterdir() if not p.name.startswith(".")] == []


def test_wrong_arguments(store: NvmeStore) -> None:
    store.write("k", torch.zeros(10)).wait()
    with pytest.raises(KeyError, match="'nope'"):
        store.read("nope", torch.zeros(10))
    with pytest.raises(KeyError, match="'nope'"):
        store.delete("nope")
    with pytest.raises(KeyError, match="'nope'"):
        store.nbytes("nope")
    with pytest.raises(ValueError, match="40 bytes"):
        store.read("k", torch.zeros(11))
    with pytest.raises(ValueError, match="contiguous"):
        store.write("t", torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="contiguous"):
        store.read("k", torch.zeros(20)[::2])


# --------------------------------------------------------------------- files and directories


def test_permissions_are_private(store: NvmeStore) -> None:
    store.write("a", torch.ones(100)).wait()
    store.write("b/../c d", torch.ones(5000)).wait()  # odd keys make safe file names
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert store.directory.parent == store.root
    files = list(store.directory.iterdir())
    assert len(files) >= 2
    for p in files:
        assert p.parent == store.directory
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with NvmeStore(tmp_path, backend="odirect") as s:
            s.write("a", torch.ones(3)).wait()
            assert stat.S_IMODE(s.directory.stat().st_mode) == 0o700
            assert {stat.S_IMODE(p.stat().st_mode) for p in s.directory.iterdir()} == {0o600}
    finally:
        os.umask(old)


def test_close_removes_everything_and_is_idempotent(store: NvmeStore) -> None:
    handles = [store.write(f"k{i}", torch.full((5000,), i)) for i in range(20)]
    store.close()  # with writes still in flight: close waits for them
    assert all(h.done() for h in handles)
    assert not store.directory.exists()
    assert list(store.root.iterdir()) == []
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.write("x", torch.ones(1))
    with pytest.raises(ValueError, match="closed"):
        store.read("k0", torch.ones(5000))


def test_context_manager_removes_files(tmp_path: Path) -> None:
    with NvmeStore(tmp_path, backend="odirect") as s:
        s.write("a", torch.ones(100_000)).wait()
        directory = s.directory
        assert any(directory.iterdir())
    assert not directory.exists()
    with pytest.raises(RuntimeError), NvmeStore(tmp_path) as s:
        directory = s.directory
        raise RuntimeError("boom")
    assert not directory.exists()


def test_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*mkdir -p"):
        NvmeStore(tmp_path / "nope")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        NvmeStore(a_file)
    with pytest.raises(ValueError, match=str(a_file / "sub")):
        NvmeStore(a_file / "sub")  # its parent is a file: cannot exist


def test_read_only_root_is_refused(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "ro", "ro,size=1m") as ro,
        pytest.raises(ValueError, match=rf"{ro}.*not writable"),
    ):
        NvmeStore(ro)


def test_unwritable_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root, chmod cannot make a directory unwritable; what the store does on EACCES from
    # mkdir is what matters, so make mkdtemp fail the way it would for a normal user.
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(swap_dirs.tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError, match=rf"{tmp_path}.*Permission denied.*nvme_dir"):
        NvmeStore(tmp_path)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_directories_of_dead_runs_are_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    stale = tmp_path / f"harmony-{pid}-abc123"
    stale.mkdir()
    (stale / "000001-x").write_bytes(b"old")
    (stale / nvme.MARKER).write_text(json.dumps({"harmony": "swap", "pid": pid, "start": None,
                                                 "boot": None}))
    alive = tmp_path / f"harmony-{os.getpid()}-zzz"  # a live run: ours
    alive.mkdir()
    other = tmp_path / "harmony-data"  # not ours by name
    other.mkdir()
    with (
        caplog.at_level(logging.WARNING, logger="harmony.swap"),
        NvmeStore(tmp_path, backend="odirect"),
    ):
        pass
    assert not stale.exists()
    assert alive.exists() and other.exists()
    lines = [
        r.getMessage()
        for r in caplog.records
        if "stale" in r.getMessage() or "dead runs" in r.getMessage()
    ]
    assert len(lines) == 1 and stale.name in lines[0] and "\n" not in lines[0]


def test_locked_directory_of_unknown_pid_is_kept(tmp_path: Path) -> None:
    # A run in another pid namespace looks dead by pid, but holds its directory's lock.
    import fcntl

    pid = dead_pid()
    held = tmp_path / f"harmony-{pid}-other"
    held.mkdir()
    (held / nvme.MARKER).write_text(json.dumps({"harmony": "swap", "pid": pid, "start": None,
                                                "boot": None}))
    fd = os.open(held / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with NvmeStore(tmp_path, backend="odirect"):
            pass
        assert held.exists()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_is_a_clear_error_and_spares_other_keys(tmp_path: Path, backend: str) -> None:
    with tmpfs(tmp_path / "small", "size=1m") as small, open_store(small, backend) as s:
        a = random_tensor(300_000, torch.uint8, seed=3)
        s.write("a", a).wait()
        h = s.write("big", torch.ones(2 << 20, dtype=torch.uint8))
        with pytest.raises(NvmeIOError) as info:
            h.wait()
        err = info.value
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC
        msg = str(err)
        assert "write" in msg and "'big'" in msg and str(2 << 20) in msg
        assert str(s.directory) in msg and "free space" in msg and "nvme_dir" in msg
        with pytest.raises(NvmeIOError):  # the error stays on the handle
            h.synchronize()
        assert "big" not in s
        with pytest.raises(KeyError, match="last write failed"):
            s.read("big", torch.ones(2 << 20, dtype=torch.uint8))
        back = torch.empty_like(a)
        s.read("a", back).wait()
        assert torch.equal(back, a)
        assert s.used_bytes == round_up(a.numel(), s._align)
        s.write("c", torch.ones(1000)).wait()  # the store still works


@pytest.mark.parametrize("backend", ["odirect", "buffered"])
def test_write_error_mid_request(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(tmp_path, backend, threads=2, chunk_bytes=SMALL_CHUNK) as s:
        keep = random_tensor(5000, torch.uint8, seed=4)
        s.write("keep", keep).wait()
        real = os.pwritev
        calls = iter(range(10**6))

        def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
            if next(calls) == 3:
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", flaky)
        n = 10 * SMALL_CHUNK + 1
        h = s.write("bad", torch.ones(n, dtype=torch.uint8))
        with pytest.raises(NvmeIOError, match=rf"write of key 'bad' \({n} bytes.*dmesg") as info:
            h.wait()
        assert info.value.errno == errno.EIO and info.value.path.startswith(str(s.directory))
        monkeypatch.setattr(os, "pwritev", real)
        assert "bad" not in s
        back = torch.empty_like(keep)
        s.read("keep", back).wait()
        assert torch.equal(back, keep)
        # A read issued while a write is in flight waits for it, and fails with its error.
        read_issued = threading.Event()

        def broken_later(*args: object) -> int:
            read_issued.wait(timeout=60)
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "pwritev", broken_later)
        w = s.write("bad2", torch.ones(10, dtype=torch.uint8))
        r = s.read("bad2", torch.empty(10, dtype=torch.uint8))
        read_issued.set()
        for handle in (w, r):
            with pytest.raises(NvmeIOError, match="bad2"):
                handle.wait()


@pytest.mark.parametrize("backend", ["odirect", "buffered"])
def test_read_issued_before_its_write_ends_sees_the_new_bytes(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(tmp_path, backend, chunk_bytes=SMALL_CHUNK) as s:
        s.write("k", torch.zeros(5 * SMALL_CHUNK, dtype=torch.uint8)).wait()
        read_issued = threading.Event()
        real = os.pwritev

        def slow(fd: int, buffers: list[memoryview], offset: int) -> int:
            read_issued.wait(timeout=60)
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", slow)
        new = random_tensor(5 * SMALL_CHUNK, torch.uint8, seed=9)
        w = s.write("k", new)
        back = torch.empty_like(new)
        r = s.read("k", back)
        assert not w.done() and not r.done()
        read_issued.set()
        r.wait()
        assert w.done(), "the read finished before the write it follows"
        assert torch.equal(back, new)


@pytest.mark.parametrize("backend", ["odirect", "buffered"])
def test_read_error_is_raised_and_key_survives(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(tmp_path, backend) as s:
        src = random_tensor(9000, torch.uint8, seed=5)
        s.write("k", src).wait()
        real = os.preadv

        def broken(fd: int, buffers: list[memoryview], offset: int) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "preadv", broken)
        h = s.read("k", torch.empty_like(src))
        with pytest.raises(NvmeIOError, match=r"read of key 'k' \(9000 bytes"):
            h.synchronize()
        monkeypatch.setattr(os, "preadv", real)
        back = torch.empty_like(src)
        s.read("k", back).wait()
        assert torch.equal(back, src)


# ------------------------------------------------------------------------ backend selection


def test_odirect_refused_falls_back_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = os.open

    def no_direct(path: object, flags: int, *args: int, **kwargs: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    with (
        caplog.at_level(logging.WARNING, logger="harmony.swap"),
        NvmeStore(tmp_path, backend="auto") as s,
    ):
        assert s.backend.startswith("odirect(off: ") and s.backend.endswith(")")
        src = random_tensor(4097, torch.float16)
        s.write("k", src).wait()
        dst = torch.empty_like(src)
        s.read("k", dst).wait()
        assert same_bits(src, dst)
    lines = [r.getMessage() for r in caplog.records if r.name == "harmony.swap"]
    assert len(lines) == 1 and "O_DIRECT refused" in lines[0] and "using buffered" in lines[0]


def test_auto_without_aio_uses_odirect_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(build: bool) -> object:
        raise AioUnavailable("libaio-dev missing")

    monkeypatch.setattr(nvme_backend, "load_aio_op", unavailable)
    with caplog.at_level(logging.WARNING, logger="harmony.swap"), NvmeStore(tmp_path) as s:
        assert s.backend == "odirect"
    lines = [r.getMessage() for r in caplog.records if r.name == "harmony.swap"]
    assert lines == [
        "harmony NVMe store: DeepSpeed async I/O unavailable (libaio-dev missing): "
        "using O_DIRECT threads"
    ]


def test_unbuilt_aio_op_is_refused_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    assert not aio_prebuilt()
    with pytest.raises(AioUnavailable, match="not built"):
        load_aio_op(build=False)  # returns at once: no import, no compile


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend='nvme'"):
        NvmeStore(tmp_path, backend="nvme")
    with pytest.raises(ValueError, match="alignment=1000"):
        NvmeStore(tmp_path, alignment=1000)
    with pytest.raises(ValueError, match="threads=0"):
        NvmeStore(tmp_path, threads=0)
    with pytest.raises(ValueError, match="chunk_bytes=5000"):
        NvmeStore(tmp_path, chunk_bytes=5000)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ helpers


def test_aligned_empty() -> None:
    for n in (0, 1, 4095, 4096, 10_000):
        for alignment in (512, 4096, 65536):
            t = aligned_empty(n, alignment)
            assert t.numel() == n and t.dtype == torch.uint8
            assert t.data_ptr() % alignment == 0 or n == 0


def test_staging_pool_is_bounded() -> None:
    made: list[int] = []

    def alloc(n: int) -> torch.Tensor:
        made.append(n)
        return aligned_empty(n)

    pool = StagingPool(2, 4096, alloc)
    a, b = pool.acquire(), pool.acquire()
    got: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire()))
    t.start()
    t.join(timeout=0.2)
    assert t.is_alive() and not got, "a third buffer was handed out while two were out"
    pool.release(a)
    t.join()
    assert got[0].data_ptr() == a.data_ptr(), "the released buffer was not reused"
    pool.release(b)
    pool.release(got[0])
    assert made == [4096, 4096]
