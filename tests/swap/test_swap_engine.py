"""The swap engine, its copiers and handles: correct bytes, counted per link and kind, FIFO per
link, stall time when compute waits. CPU runs the same code paths with worker threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
import torch

from swap.engine import SwapEngine
from swap.handle import DoneHandle, FutureHandle, GroupHandle, timed
from swap.stats import Stats
from swap.streams import CudaCopier, ThreadCopier, host_pinning, make_copier

CPU = torch.device("cpu")
LINK = "host->device"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def noop(_: float) -> None:
    pass


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event that blocks a worker; set at teardown (and after 10 s) so nothing hangs."""
    event = threading.Event()
    timer = threading.Timer(10.0, event.set)
    timer.start()
    yield event
    event.set()
    timer.cancel()


def block_link(copier: ThreadCopier, link: str, gate: threading.Event) -> None:
    """Occupy ``link``'s worker until ``gate`` is set; what is queued behind it waits."""

    def hold() -> None:
        gate.wait(10.0)

    copier.submit(link, hold, noop)


def random_tensor(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(n, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(dtype)


# -- the engine ----------------------------------------------------------------------------------

def test_doc_example() -> None:
    e = SwapEngine(CPU, Stats())
    dst = torch.empty(4)
    h = e.copy(dst, torch.ones(4), "host->device", "W")
    e.wait(h, "host->device")
    assert e.stats.bytes_moved["host->device"] == 16
    e.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("n", [1, 3, 1023, 4097])
def test_copies_are_exact(engine: SwapEngine, dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    src = random_tensor(dtype, n, gen)
    dst = torch.zeros(n, dtype=dtype)
    engine.wait(engine.copy(dst, src, LINK, "X"), LINK)
    assert torch.equal(dst, src)
    assert engine.stats.bytes_moved[LINK] == n * src.element_size()


def test_copy_of_shaped_and_strided_tensors(engine: SwapEngine) -> None:
    src = torch.arange(35, dtype=torch.float64).reshape(5, 7).t()  # not contiguous
    dst = torch.empty(7, 5, dtype=torch.float64)
    engine.synchronize(engine.copy(dst, src, LINK, "W"), LINK)
    assert torch.equal(dst, src)
    assert engine.stats.bytes_moved[LINK] == 35 * 8


def test_bytes_per_link_and_kind(engine: SwapEngine) -> None:
    handles = [
        engine.copy(torch.empty(7, dtype=torch.float16), torch.ones(7, dtype=torch.float16),
                    "host->device", "W"),
        engine.copy(torch.empty(3), torch.ones(3), "host->device", "X"),
        engine.copy(torch.empty(5, dtype=torch.int64), torch.ones(5, dtype=torch.int64),
                    "device->host", "G"),
        engine.copy(torch.empty(7, dtype=torch.float16), torch.ones(7, dtype=torch.float16),
                    "host->device", "W"),
    ]
    for h in handles:
        h.synchronize()
    engine.count("nvme->host", "K", 4096, seconds=0.5)
    engine.count("host->nvme", "K", 100)
    s = engine.stats
    assert dict(s.bytes_moved) == {"host->device": 28 + 12, "device->host": 40,
                                   "nvme->host": 4096, "host->nvme": 100}
    assert dict(s.bytes_by_kind) == {("host->device", "W"): 28, ("host->device", "X"): 12,
                                     ("device->host", "G"): 40, ("nvme->host", "K"): 4096,
                                     ("host->nvme", "K"): 100}
    assert s.kind_bytes("host->device", "W") == 28
    assert s.kind_bytes("device->host", "W") == 0
    assert s.busy_seconds["nvme->host"] >= 0.5
    assert "host->nvme" not in s.busy_seconds  # no time given, none counted
    assert {"host->device", "device->host"} <= set(s.busy_seconds)  # copies are timed


@pytest.mark.parametrize(("dst", "src", "match"), [
    (torch.empty(4, dtype=torch.float16), torch.ones(4), r"\(4,\) torch.float32 into \(4,\) "
     r"torch.float16"),
    (torch.empty(5), torch.ones(4), r"copy on host->device: \(4,\) torch.float32 into \(5,\)"),
    (torch.empty(2, 2), torch.ones(2, 3), r"\(2, 3\) torch.float32 into \(2, 2\)"),
])
def test_mismatch_raises_before_copying(engine: SwapEngine, dst: torch.Tensor, src: torch.Tensor,
                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        engine.copy(dst, src, LINK, "W")
    assert not engine.stats.bytes_moved


def test_shape_mismatch_with_equal_numel_raises_before_copying(engine: SwapEngine) -> None:
    with pytest.raises(ValueError, match=r"\(6,\) torch.float32 into \(2, 3\)"):
        h = engine.copy(torch.empty(2, 3), torch.ones(6), LINK, "W")
        h.synchronize()
    assert not engine.stats.bytes_moved


def test_errors_on_the_worker_surface_at_wait() -> None:
    copier = ThreadCopier()

    def fail() -> None:
        raise OSError("disk full")

    h = copier.submit("host->nvme", fail, noop)
    with pytest.raises(OSError, match="disk full"):
        h.synchronize()
    with pytest.raises(OSError, match="disk full"):
        SwapEngine(CPU, Stats()).wait(h, "host->nvme")
    copier.close()


class Slow:
    """A copy that finishes when ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def done(self) -> bool:
        return self.event.is_set()

    def wait(self) -> None:
        assert self.event.wait(10.0)

    synchronize = wait


def test_stall_is_counted_when_compute_waits(engine: SwapEngine, gate: threading.Event) -> None:
    threading.Timer(0.02, gate.set).start()
    engine.wait(Slow(gate), LINK)
    stall = engine.stats.stall_seconds[LINK]
    assert 0 < stall < 5
    assert "device->host" not in engine.stats.stall_seconds


def test_no_stall_for_a_finished_copy(engine: SwapEngine) -> None:
    engine.wait(DoneHandle(), LINK)
    assert LINK not in engine.stats.stall_seconds
    engine.synchronize(DoneHandle(), LINK)  # the host always pays for a synchronize call
    assert 0 <= engine.stats.stall_seconds[LINK] < 5


def test_stall_on_a_real_copy_stuck_behind_its_link(gate: threading.Event,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONY_COPIER", raising=False)  # (the thread copier's worker)
    engine = SwapEngine(CPU, Stats())
    copier = engine._copier
    assert isinstance(copier, ThreadCopier)
    block_link(copier, LINK, gate)
    src, dst = torch.arange(1000.0), torch.zeros(1000)
    h = engine.copy(dst, src, LINK, "W")
    assert not h.done()
    assert not torch.equal(dst, src)
    threading.Timer(0.02, gate.set).start()
    engine.wait(h, LINK)
    assert torch.equal(dst, src)
    assert 0 < engine.stats.stall_seconds[LINK] < 5
    engine.close()


# -- copiers -------------------------------------------------------------------------------------

def test_thread_copier_is_fifo_per_link(gate: threading.Event) -> None:
    copier = ThreadCopier()
    dst = torch.zeros(64)
    copier.copy(dst, torch.zeros(64), "L", noop).synchronize()  # a copy starts the worker
    block_link(copier, "L", gate)
    seen: list[torch.Tensor] = []
    handles = []
    for i in range(6):
        handles.append(copier.copy(dst, torch.full((64,), float(i)), "L", noop))
        handles.append(copier.submit("L", lambda: seen.append(dst.clone()), noop))
    assert not any(h.done() for h in handles)
    gate.set()
    for h in handles:
        h.synchronize()
    assert [int(t[0]) for t in seen] == list(range(6))
    assert all(torch.equal(t, t[:1].expand(64)) for t in seen)
    assert torch.equal(dst, torch.full((64,), 5.0))
    copier.close()


def test_thread_copier_links_are_independent(gate: threading.Event) -> None:
    copier = ThreadCopier()
    block_link(copier, "host->device", gate)
    stuck = copier.copy(torch.empty(3), torch.ones(3), "host->device", noop)
    dst = torch.zeros(3)
    copier.copy(dst, torch.ones(3), "device->host", noop).synchronize()
    assert torch.equal(dst, torch.ones(3))
    assert not stuck.done()
    gate.set()
    stuck.synchronize()
    copier.close()


def test_thread_copier_times_each_copy() -> None:
    copier = ThreadCopier()
    seconds: list[float] = []
    copier.copy(torch.empty(10), torch.ones(10), "L", seconds.append).synchronize()
    copier.submit("L", lambda: None, seconds.append).synchronize()
    assert len(seconds) == 2 and all(0 <= s < 5 for s in seconds)
    copier.close()


def test_thread_copier_close_waits_for_queued_copies(gate: threading.Event) -> None:
    copier = ThreadCopier()
    block_link(copier, "L", gate)
    dst = torch.zeros(8)
    h = copier.copy(dst, torch.ones(8), "L", noop)
    threading.Timer(0.02, gate.set).start()
    copier.close()
    assert h.done() and torch.equal(dst, torch.ones(8))
    copier.copy(dst, torch.full((8,), 2.0), "L", noop).synchronize()  # usable after close
    assert torch.equal(dst, torch.full((8,), 2.0))
    copier.close()


def test_make_copier_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONY_COPIER", raising=False)
    assert isinstance(make_copier(CPU), ThreadCopier)
    assert not host_pinning(CPU)


# -- handles and stats ---------------------------------------------------------------------------

def test_handles() -> None:
    done = DoneHandle()
    assert done.done() and done.wait() is None and done.synchronize() is None
    fut: Future[None] = Future()
    h = FutureHandle(fut)
    group = GroupHandle([done, h])
    assert not h.done() and not group.done()
    fut.set_result(None)
    assert h.done() and group.done()
    group.wait()
    group.synchronize()
    bad: Future[None] = Future()
    bad.set_exception(OSError("read failed"))
    with pytest.raises(OSError, match="read failed"):
        GroupHandle([done, FutureHandle(bad)]).synchronize()


def test_timed_reports_even_on_error() -> None:
    seconds: list[float] = []

    def fail() -> None:
        raise RuntimeError("boom")

    run: Callable[[], None] = timed(fail, seconds.append)
    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert len(seconds) == 1 and seconds[0] >= 0


def test_stats_reset_and_summary() -> None:
    s = Stats()
    s.count("host->device", "W", 3 << 30)
    s.count("device->host", "G", 1 << 29)
    s.busy("host->device", 1.0)
    s.stall("host->device", 0.25)
    s.peak_bytes["device"] = 1 << 30
    s.seconds["step"] += 2.0
    s.skipped_steps = 3
    assert s.summary() == ("device->host: 0.500 GiB, host->device: 3.000 GiB, "
                           "peak device: 1.000 GiB")
    s.reset()
    assert not any((s.bytes_moved, s.bytes_by_kind, s.busy_seconds, s.stall_seconds,
                    s.peak_bytes, s.seconds, s.skipped_steps))
    s.count("host->device", "W", 1)
    assert s.bytes_moved["host->device"] == 1


def test_stats_count_from_many_threads() -> None:
    s = Stats()

    def work() -> None:
        for _ in range(2000):
            s.count("L", "W", 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.bytes_moved["L"] == s.kind_bytes("L", "W") == 8000


# -- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.cuda
@cuda
def test_cuda_engine_round_trip() -> None:
    dev = torch.device("cuda")
    e = SwapEngine(dev, Stats())
    assert isinstance(e._copier, CudaCopier)
    src = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    on_dev = torch.empty(1 << 20, device=dev)
    back = torch.empty(1 << 20).pin_memory()
    h = e.copy(on_dev, src, "host->device", "W")
    e.wait(h, "host->device")  # the compute stream waits; the host does not
    doubled = on_dev * 2
    h2 = e.copy(back, on_dev, "device->host", "W")
    e.synchronize(h2, "device->host")
    assert torch.equal(back, src)
    assert torch.equal(doubled.cpu(), src * 2)
    assert h.done() and h2.done()
    assert e.stats.bytes_moved == {"host->device": 4 << 20, "device->host": 4 << 20}
    assert e.stats.busy_seconds["host->device"] > 0
    e.close()


@pytest.mark.cuda
@cuda
def test_cuda_copy_waits_for_compute_that_writes_its_source() -> None:
    dev = torch.device("cuda")
    copier = CudaCopier(dev)
    x = torch.ones(1 << 22, device=dev)
    for _ in range(20):
        x = x * 1.0001  # queued on the compute stream
    out = torch.empty(1 << 22).pin_memory()
    times: list[float] = []
    copier.copy(out, x, "device->host", times.append).synchronize()
    assert torch.equal(out, x.cpu())
    assert len(times) == 1
    copier.close()


@pytest.mark.cuda
@cuda
def test_host_pinning_with_cuda() -> None:
    assert host_pinning(torch.device("cuda"))
    assert isinstance(make_copier(torch.device("cuda")), CudaCopier)
