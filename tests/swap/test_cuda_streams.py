"""The CUDA copier's ordering, devices, timing and accounting, checked on CPU against a
recording stand-in for torch.cuda (tests/cuda_fakes.py): which stream waits on which event,
on which device, is exactly what a CPU run of the real copier cannot show."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swap.engine import SwapEngine
from swap.nvme import NvmeStore
from swap.staging import read_staged
from swap.stats import Stats
from swap.streams import CudaCopier, CudaHandle
from swap.tier import Tier
from tests.cuda_fakes import FakeCuda, on_device

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    # These tests are of the CUDA copier itself, which the deferred copier would replace.
    monkeypatch.delenv("HARMONY_COPIER", raising=False)
    return FakeCuda(devices=2).install(monkeypatch)


@pytest.fixture
def copier(fake: FakeCuda) -> Iterator[CudaCopier]:
    c = CudaCopier(CUDA0)
    yield c
    c.close()


def _copy(c: CudaCopier, link: str = "host->device", times: list[float] | None = None
          ) -> CudaHandle:
    out = [] if times is None else times
    h = c.copy(torch.empty(4), torch.ones(4), link, out.append)
    assert isinstance(h, CudaHandle)
    return h


def test_wait_orders_the_stream_of_the_copys_device_not_the_current_devices(
        fake: FakeCuda) -> None:
    """On cuda:1 with the current device 0 (every rank >= 1 before set_device), compute on
    cuda:1 must wait for the copy: the wait goes to cuda:1's current stream."""
    c = CudaCopier(CUDA1)
    h = _copy(c)
    assert h.device == CUDA1
    h.wait()
    (_, stream, event), = fake.calls("wait_event")[-1:]
    assert stream is fake.current_stream(1) and stream is not fake.current_stream(0)
    assert event is h.event
    c.close()


def test_cuda_without_an_index_means_the_current_device(fake: FakeCuda) -> None:
    fake.set_device(1)
    assert CudaCopier(torch.device("cuda")).device == CUDA1


def test_a_copy_waits_for_the_issuing_threads_current_stream(fake: FakeCuda,
                                                             copier: CudaCopier) -> None:
    user = fake.new_stream(CUDA0)
    with torch.cuda.stream(user):  # type: ignore[arg-type]
        _copy(copier)
    (_, copy_stream, waited), = fake.calls("wait_stream")
    assert waited is user and copy_stream in fake.streams_made


def test_a_staged_read_copies_after_a_mark_of_the_issuing_stream(
        fake: FakeCuda, tmp_path: Path) -> None:
    """The second hop runs on a follow-up thread when the file read ends: it must wait for
    the compute issued before the transfer, on the issuing thread's stream, not for all that
    the follow-up thread's own (default) stream holds by then."""
    stats = Stats()
    engine = SwapEngine(CUDA0, stats)
    with NvmeStore(tmp_path, backend="odirect") as store:
        src = torch.arange(1000, dtype=torch.float32)
        store.write("W2", src).wait()
        compute = fake.new_stream(CUDA0)
        dst = torch.zeros(1000)
        host = Tier("host", torch.device("cpu"))
        with torch.cuda.stream(compute):  # type: ignore[arg-type]
            h = read_staged(store, engine, host, "W2", dst, "W")
        h.synchronize()
        engine.close()
    assert torch.equal(dst, src)
    marks = [c[1] for c in fake.calls("record") if c[2] is compute]
    assert len(marks) == 1  # recorded on the issuing stream, at issue time
    waits = fake.calls("wait_event")
    assert any(c[2] is marks[0] for c in waits)
    assert fake.calls("wait_stream") == []  # never "all the follow-up thread's stream holds"


def test_busy_time_is_counted_without_anyone_polling_the_handle(fake: FakeCuda) -> None:
    stats = Stats()
    engine = SwapEngine(CUDA0, stats)
    fake.elapsed_ms = 3.0
    engine.copy(torch.empty(4), torch.ones(4), "host->device", "W")  # nobody polls it
    engine.settle()
    assert stats.busy_seconds["host->device"] == pytest.approx(0.003)
    fake.hold = True  # the next copy's events are not reached yet
    h = engine.copy(torch.empty(4), torch.ones(4), "device->host", "G")
    engine.settle()
    assert "device->host" not in stats.busy_seconds  # not reached: not counted yet...
    engine.close()  # ...but counted at the end, once
    assert stats.busy_seconds["device->host"] == pytest.approx(0.003)
    assert h.done()
    assert stats.busy_seconds["device->host"] == pytest.approx(0.003)  # still once


def test_a_stall_is_the_time_the_compute_stream_waited(fake: FakeCuda) -> None:
    """Not the host's time around wait(), which only enqueues a wait and returns at once."""
    stats = Stats()
    engine = SwapEngine(CUDA0, stats)
    fake.hold = True
    h = engine.copy(torch.empty(4), torch.ones(4), "host->device", "W")
    fake.elapsed_ms = 7.0
    engine.wait(h, "host->device")
    compute = fake.current_stream(0)
    records = [c for c in fake.calls("record") if c[2] is compute]
    assert len(records) == 2  # one event on either side of the wait
    i_wait = fake.log.index(("wait_event", compute, h.event))
    assert fake.log.index(records[0]) < i_wait < fake.log.index(records[1])
    engine.settle()
    assert stats.stall_seconds.get("host->device", 0.0) == 0.0  # not reached yet
    fake.synchronize()
    engine.settle()
    assert stats.stall_seconds["host->device"] == pytest.approx(0.007)
    engine.close()
    assert stats.stall_seconds["host->device"] == pytest.approx(0.007)


def test_a_finished_copy_costs_no_stall_events(fake: FakeCuda, copier: CudaCopier) -> None:
    engine = SwapEngine(CUDA0, Stats())
    h = engine.copy(torch.empty(4), torch.ones(4), "host->device", "W")
    before = len(fake.calls("record"))
    engine.wait(h, "host->device")
    assert len(fake.calls("record")) == before and engine.stats.stall_seconds == {}
    engine.close()


def test_threads_share_one_stream_per_link(fake: FakeCuda, copier: CudaCopier,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    make = fake.new_stream

    def slow_stream(device: object = None, **kw: object) -> object:
        time.sleep(0.05)  # a window in which an unlocked table would make a second stream
        return make(device)

    monkeypatch.setattr(torch.cuda, "Stream", slow_stream)
    threads = [threading.Thread(target=_copy, args=(copier, "device->host")) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.streams_made) == 1
    assert {c[1] for c in fake.calls("wait_stream")} == set(fake.streams_made)


def test_a_copys_time_is_reported_once_however_many_threads_poll_it(
        fake: FakeCuda, copier: CudaCopier) -> None:
    times: list[float] = []
    h = _copy(copier, times=times)
    threads = [threading.Thread(target=h.done) for _ in range(8)]
    threads += [threading.Thread(target=h.synchronize) for _ in range(4)]
    threads += [threading.Thread(target=copier.settle)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    copier.close()
    assert times == [pytest.approx(0.001)]


def test_a_non_contiguous_device_source_is_made_contiguous_on_compute_and_charged(
        fake: FakeCuda) -> None:
    device_tier = Tier("device", torch.device("cpu"), capacity=1 << 10)
    c = CudaCopier(CUDA0, device_tier)
    src = on_device(torch.arange(12.0).reshape(3, 4).t(), fake)  # a transposed activation
    dst = torch.empty(4, 3)
    fake.hold = True
    h = c.copy(dst, src, "device->host", lambda s: None)
    (_, made_on), = fake.calls("contiguous")
    assert made_on is fake.current_stream(0)  # the compute stream, not the copy stream
    assert device_tier.used == 48  # charged while the copy may still read it
    copy_stream = fake.streams_made[0]
    assert ("record_stream", copy_stream) in fake.log  # its block outlives the copy
    fake.synchronize()
    assert h.done()
    device_tier.charge(0)  # (the tier takes back what finished copies released)
    assert device_tier.used == 0
    assert torch.equal(dst, torch.arange(12.0).reshape(3, 4).t())
    c.close()


def test_a_non_contiguous_device_destination_is_refused(fake: FakeCuda,
                                                        copier: CudaCopier) -> None:
    dst = on_device(torch.empty(4, 3).t(), fake)
    with pytest.raises(ValueError, match="not contiguous"):
        copier.copy(dst, torch.ones(3, 4), "host->device", lambda s: None)
