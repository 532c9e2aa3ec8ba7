"""Chunked updates of NVMe-homed packs on the update worker (Trainer(overlap_updates=True)),
behind the next pack's backward: exact, within the host budget as predicted, never waiting
on the runtime's thread for room, and failing cleanly."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from harmony.runtime.chunked_update import ChunkedUpdate
from harmony.runtime.runtime import Runtime
from schedules.task import Loc
from swap.nvme import NvmeIOError
from tests.models import reference_train
from tests.runtime.test_chunked_update import (
    CHUNK,
    LOSS,
    MBS,
    Factory,
    _batches,
    adamw,
    everything_on_nvme,
    sgd,
    stacks,
)


class OnThreads:
    """An optimizer factory recording the thread each pack's step ran on, per step."""

    def __init__(self, opt: Factory) -> None:
        self.opt = opt
        self.threads: list[set[str]] = [set()]  # one set per step (the first: the probe's)

    def __call__(self, ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = self.opt(ps)
        step = opt.step

        def recorded(*args: object, **kwargs: object) -> object:
            self.threads[-1].add(threading.current_thread().name)
            return step(*args, **kwargs)

        opt.step = recorded  # type: ignore[method-assign]
        return opt


def _train(nvme: Path, opt: Factory, batches: list[tuple[torch.Tensor, torch.Tensor]],
           record: OnThreads | None = None, **kwargs: object) -> harmony.Trainer:
    given = everything_on_nvme(stacks, opt, CHUNK, str(kwargs.get("precision", "fp32")))
    t = harmony.Trainer(stacks(), LOSS, optimizer=record or opt, micro_batch_size=MBS,
                        nvme_dir=nvme, plan=given, **kwargs)  # type: ignore[arg-type]
    for b in batches:
        if record is not None:
            record.threads.append(set())
        t.step(*b)
    return t


@pytest.mark.parametrize("opt", [adamw, sgd])
def test_overlapped_nvme_updates_equal_pytorch(tmp_path: Path, opt: Factory) -> None:
    batches = _batches()
    record = OnThreads(opt)
    with _train(tmp_path, opt, batches, record, overlap_updates=True) as t:
        assert t.runtime is not None
        assert max(len(p.chunks) for p in t.runtime.packs) >= 6
        # the first step creates the optimizer state (its size only estimated): in line;
        # the next ones on the update worker
        assert not any(n.startswith("harmony-update") for n in record.threads[1])
        assert all(any(n.startswith("harmony-update") for n in s) for s in record.threads[2:])
        assert t.stats.busy_seconds["update"] > 0
        got = t.state_dict()
    want = reference_train(stacks(), LOSS, opt, batches, MBS)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_overlapped_bf16_equals_serial(tmp_path: Path) -> None:
    """Mixed precision: the masters' chunk files are read and written on the worker."""
    runs = []
    for overlap in (True, False):
        (tmp_path / str(overlap)).mkdir()
        with _train(tmp_path / str(overlap), adamw, _batches(), precision="bf16",
                    overlap_updates=overlap) as t:
            runs.append(t.state_dict())
    for k in runs[1]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def slow_writes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every file write of the NVMe store's engines takes ``seconds`` longer (a busy disk)."""
    import swap.aio
    import swap.direct_io

    for engine in (swap.aio.AioIO, swap.direct_io.PosixIO):
        def pwrite(self: object, *args: object, _write: Callable[..., None] = engine.pwrite
                   ) -> None:
            time.sleep(seconds)
            _write(self, *args)

        monkeypatch.setattr(engine, "pwrite", pwrite)


@pytest.mark.parametrize("host,overlapped", [(400 << 10, True), (300 << 10, False)])
@pytest.mark.parametrize("slow", [False, True], ids=["disk", "slow disk"])
def test_overlapped_host_peak_within_budget_as_predicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: int, overlapped: bool,
        slow: bool) -> None:
    """Host budgets below one pack's W + K. With room for it, the updates on the worker
    (each holding three chunks until joined) and the next packs' staged chunks stay within
    the budget, as the simulator predicts; with less, the plan updates in line (where
    overlap_updates=False would fit, True must too). A disk slower than planned leaves the
    last chunks' writes in flight as the next pack stages its own: the host tier waits for
    them rather than go above the predicted peak."""
    batches = _batches(4)
    if slow:
        slow_writes(monkeypatch, 0.01)
    with harmony.Trainer(stacks(), LOSS, optimizer=adamw, micro_batch_size=MBS,
                         device_memory=400 << 10, host_memory=host, nvme_dir=tmp_path,
                         overlap_updates=True) as t:
        t.step(*batches[0])
        t.stats.reset()
        t.tiers[Loc.HOST].reset_peak()
        for b in batches[1:]:
            t.step(*b)
        assert t.plan is not None and Loc.NVME in t.plan.placement.k
        assert t.plan.overlap_updates is overlapped
        # (the NVMe packs' steps ran on the worker, or none did)
        assert (t.stats.busy_seconds["update"] > 0) is overlapped
        peak = t.stats.peak_bytes["host"]
        assert peak <= host
        predicted = t.plan.predicted.peak[Loc.HOST]
        assert abs(peak - predicted) <= 0.05 * predicted, (peak, predicted)
        got = t.state_dict()
    want = reference_train(stacks(), LOSS, adamw, batches, MBS)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_full_host_tier_joins_the_update_in_flight(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The update on the worker reserves every free host byte, so whatever the runtime's
    thread allocates next does not fit: the tier's ``when_full`` joins the update (which
    never waits on that thread), its reservation comes back, and the step goes on, exact."""
    window = ChunkedUpdate.window_bytes

    def greedy(self: ChunkedUpdate) -> int:
        held = sum(b.numel() for h in self.held.values() for b in h.buffers())
        assert self.host.capacity is not None
        return max(window(self), self.host.capacity - self.host.used + held)

    monkeypatch.setattr(ChunkedUpdate, "window_bytes", greedy)
    joins: list[bool] = []
    full = Runtime.host_full

    def counted(self: Runtime) -> bool:
        joins.append(full(self))
        return joins[-1]

    monkeypatch.setattr(Runtime, "host_full", counted)
    batches = _batches()
    host = 1 << 20
    with _train(tmp_path, adamw, batches, host_memory=host, overlap_updates=True) as t:
        assert any(joins)
        assert t.stats.peak_bytes["host"] <= host
        got = t.state_dict()
    want = reference_train(stacks(), LOSS, adamw, batches, MBS)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failed_state_write_is_clear_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool) -> None:
    """An I/O error writing optimizer state, from the worker or in line, ends the step with
    that error; every host byte of the update comes back (whichever chunk's write failed
    first), and the saved checkpoint still loads."""
    batches = _batches(3)
    (tmp_path / "a").mkdir()
    t = _train(tmp_path / "a", adamw, batches[:1], overlap_updates=overlap,
               nvme_backend="odirect")
    with t:
        t.save(tmp_path / "ckpt")
        saved = t.state_dict()
        host = t.tiers[Loc.HOST]
        host.drain()  # (the last chunks' buffers go back once their writes end)
        before = host.used
        real = os.pwritev

        def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
            if ".K." in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", flaky)
        with pytest.raises(NvmeIOError, match=r"write of key 'pack\d+\.K\.\d+'"):
            t.step(*batches[1])
        monkeypatch.setattr(os, "pwritev", real)
        assert t.step_count == 1
        host.drain()
        assert host.used == before  # the reservation and the chunks' buffers came back
        with pytest.raises(RuntimeError, match="load"):  # no training on mixed weights
            t.step(*batches[2])
    (tmp_path / "b").mkdir()
    with _train(tmp_path / "b", adamw, [], overlap_updates=True) as fresh:
        fresh.load(tmp_path / "ckpt")
        assert fresh.step_count == 1
        got = fresh.state_dict()
    for k in saved:
        assert torch.equal(got[k], saved[k]), k
