"""Two-hop transfers (NVMe <-> host staging <-> device) that never block the issuing thread:
``SwapEngine.after`` and :mod:`swap.staging`. On CPU the "device" is host memory, so the same
chained path runs here that a GPU takes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from swap.engine import SwapEngine
from swap.handle import DoneHandle, FutureHandle, Handle
from swap.nvme import NvmeIOError, NvmeStore
from swap.staging import read_staged, write_staged
from swap.tier import Tier

CPU = torch.device("cpu")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NvmeStore]:
    with NvmeStore(tmp_path, backend="odirect") as s:
        yield s


def pending() -> tuple[Future[None], Handle]:
    """A handle that is done when the returned future is resolved by the test."""
    f: Future[None] = Future()
    return f, FutureHandle(f)


def test_after_runs_the_follow_up_only_once_the_first_is_done(engine: SwapEngine) -> None:
    gate, first = pending()
    started = threading.Event()

    def then() -> Handle:
        started.set()
        return DoneHandle()

    h = engine.after(first, then, "nvme->host")  # returns at once although first is pending
    assert not started.wait(0.2) and not h.done()
    gate.set_result(None)
    h.synchronize()
    assert started.is_set() and h.done()


def test_after_raises_the_first_error_and_skips_the_follow_up(engine: SwapEngine) -> None:
    gate, first = pending()
    ran: list[int] = []
    h = engine.after(first, lambda: ran.append(1) or DoneHandle(), "nvme->host")
    gate.set_exception(NvmeIOError(28, "no space left"))
    with pytest.raises(NvmeIOError, match="no space"):
        h.wait()
    assert h.done() and ran == []  # failed is finished: a tier may release its buffers


def test_after_raises_the_follow_ups_error(engine: SwapEngine) -> None:
    def then() -> Handle:
        raise OSError(5, "bad follow-up")

    h = engine.after(DoneHandle(), then, "host->nvme")
    with pytest.raises(OSError, match="bad follow-up"):
        h.synchronize()


def test_after_keeps_fifo_order_per_link(engine: SwapEngine) -> None:
    order: list[int] = []
    gate, first = pending()
    handles = [engine.after(first, lambda: order.append(0) or DoneHandle(), "a")]
    handles += [engine.after(DoneHandle(), lambda i=i: order.append(i) or DoneHandle(), "a")
                for i in (1, 2)]
    gate.set_result(None)
    for h in handles:
        h.synchronize()
    assert order == [0, 1, 2]


@pytest.mark.parametrize("dtype,n", [(torch.float32, 1000), (torch.bfloat16, 4097),
                                     (torch.int64, 3)])
def test_staged_write_then_read_round_trips(engine: SwapEngine, store: NvmeStore,
                                            dtype: torch.dtype, n: int) -> None:
    host = Tier("host", CPU, capacity=1 << 20)
    src = (torch.arange(n) * 7 - 11).to(dtype).reshape(-1, 1)[:, 0]  # any shape
    write_staged(store, engine, host, "x", src, "X").synchronize()  # the key exists now
    dst = torch.empty_like(src)
    read_staged(store, engine, host, "x", dst, "X").wait()
    assert torch.equal(dst, src)
    nbytes = src.numel() * src.element_size()
    moved = engine.stats.bytes_moved
    assert moved["device->host"] == moved["host->nvme"] == nbytes
    assert moved["nvme->host"] == moved["host->device"] == nbytes
    assert host.peak >= nbytes  # the staging buffers were charged to the host tier...
    host.drain()
    assert host.used == 0  # ...and returned once their second hop was done


def test_staged_read_does_not_block_on_the_disk(engine: SwapEngine, store: NvmeStore) -> None:
    """The read is queued behind a write that cannot finish yet: read_staged still returns,
    and its handle is done only after the bytes reached dst."""
    host = Tier("host", CPU)
    src = torch.arange(4096, dtype=torch.float32)
    gate, held = pending()
    write = engine.after(held, lambda: store.write("w", src), "host->nvme")
    dst = torch.zeros_like(src)
    # The read follows the write on the same follow-up link, so it cannot start before it.
    r = engine.after(write, lambda: read_staged(store, engine, host, "w", dst, "W"),
                     "host->nvme")
    assert not r.done()
    gate.set_result(None)
    r.synchronize()
    assert torch.equal(dst, src)


def test_a_failed_staged_write_raises_and_frees_its_staging(engine: SwapEngine, store: NvmeStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    host = Tier("host", CPU)
    import swap.nvme as nvme

    def full(fd: int, path: str, nbytes: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nvme, "reserve", full)
    # (Raised by the handle, or at once if the write failed before the staging buffer's
    # release was registered: a tier re-raises a finished transfer's error.)
    with pytest.raises(OSError, match="space"):
        write_staged(store, engine, host, "k", torch.ones(10), "K").synchronize()
    with contextlib.suppress(OSError):  # the tier may report the failed transfer again...
        host.drain()
    assert host.used == 0  # ...and takes its staging buffer back either way


# -- the key of a staged write is the store's from the moment the write is issued ---------------

def _hold_link(engine: SwapEngine, link: str) -> threading.Event:
    """Occupy ``link``'s copy worker until the returned event is set (a slow device copy)."""
    gate = threading.Event()
    timer = threading.Timer(10.0, gate.set)  # never hangs the suite
    timer.daemon = True
    timer.start()
    engine._copier.submit(link, lambda: gate.wait(10.0), lambda s: None)
    return gate


def _data_files(store: NvmeStore) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir() if not p.name.startswith("."))


def test_a_staged_write_deleted_before_its_copy_ends_leaves_no_file(
        engine: SwapEngine, store: NvmeStore) -> None:
    host = Tier("host", CPU)
    gate = _hold_link(engine, "device->host")
    h = write_staged(store, engine, host, "X3.0.0", torch.ones(4096), "X")
    assert "X3.0.0" in store  # known at once, although its bytes have not left the device
    store.delete("X3.0.0")  # what the runtime does when it drops the activation early
    gate.set()
    h.synchronize()
    host.drain()
    assert _data_files(store) == [] and store.used_bytes == 0
    assert host.used == 0


def test_a_staged_write_read_before_its_copy_ends_reads_its_bytes(
        engine: SwapEngine, store: NvmeStore) -> None:
    host = Tier("host", CPU)
    gate = _hold_link(engine, "device->host")
    src = torch.arange(3000, dtype=torch.float32)
    w = write_staged(store, engine, host, "W0", src, "W")
    dst = torch.zeros_like(src)
    r = read_staged(store, engine, host, "W0", dst, "W")  # no KeyError: the read waits
    assert not r.done()
    gate.set()
    r.synchronize()
    w.synchronize()
    assert torch.equal(dst, src)


def test_a_failed_device_copy_fails_the_pending_write_and_its_readers(
        engine: SwapEngine, store: NvmeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Tier("host", CPU)
    copy = engine._copier.copy

    def broken(dst: torch.Tensor, src: torch.Tensor, link: str, on_done, **kw) -> Handle:
        if link != "device->host":
            return copy(dst, src, link, on_done, **kw)
        f: Future[None] = Future()
        f.set_exception(RuntimeError("CUDA error: an illegal memory access"))
        return FutureHandle(f)

    monkeypatch.setattr(engine._copier, "copy", broken)
    gate, held = pending()
    # The write's follow-up waits behind this one, so the read below is issued first.
    engine.after(held, lambda: DoneHandle(), "host->nvme")
    w = write_staged(store, engine, host, "K1", torch.ones(100), "K")
    dst = torch.empty(100)
    r = read_staged(store, engine, host, "K1", dst, "K")
    gate.set_result(None)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        w.synchronize()
    with pytest.raises(OSError, match="write it follows failed"):
        r.synchronize()
    assert "K1" not in store
    with pytest.raises(KeyError, match="illegal memory access"):
        store.read("K1", dst)
    for _ in range(2):  # (a drain stops at the first failed transfer it re-raises)
        with contextlib.suppress(Exception):
            host.drain()
    assert host.used == 0 and _data_files(store) == []


def test_close_ends_a_pending_write_that_never_started(tmp_path: Path) -> None:
    store = NvmeStore(tmp_path, backend="odirect")
    pending_write = store.write_later("k", 10)
    assert "k" in store
    store.close()  # returns (it does not wait for bytes that will not come)
    with pytest.raises(ValueError, match="closed before the write"):
        pending_write.handle.wait()
    pending_write.start(torch.zeros(10, dtype=torch.uint8))  # too late: does nothing


def test_a_pending_write_checks_its_bytes_and_starts_once(store: NvmeStore) -> None:
    p = store.write_later("k", 8)
    with pytest.raises(ValueError, match="8"):
        p.start(torch.zeros(3, dtype=torch.uint8))
    p.start(torch.arange(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="once"):
        store._start_pending(p._job, torch.zeros(8, dtype=torch.uint8))
    p.handle.wait()
    out = torch.empty(8, dtype=torch.uint8)
    store.read("k", out).wait()
    assert torch.equal(out, torch.arange(8, dtype=torch.uint8))


def test_a_pending_write_whose_key_was_replaced_skips_its_io(
        store: NvmeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = store.write_later("k", 4096)
    store.write("k", torch.ones(1024)).wait()  # a newer value: nobody can read the first
    writes: list[int] = []
    pwrite = store._engine.pwrite
    monkeypatch.setattr(store._engine, "pwrite",
                        lambda fd, path, buf, off: writes.append(off) or pwrite(fd, path, buf, off))
    first.start(torch.zeros(4096, dtype=torch.uint8)).wait()
    assert writes == [] and len(_data_files(store)) == 1
