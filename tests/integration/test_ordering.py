"""What a GPU's asynchronous copies demand of the runtime, checked on CPU with the deferred
copier (``swap.deferred``): a buffer goes back to its pool only after every copy touching it,
the host blocks on the device once per step, copies read pinned staging buffers rather than
the caller's tensors, a failed copy fails its own step, buffers a forward changes go home
through the engine, and recorded task times come from the device's clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import harmony
from harmony.parallel.dist import Group
from schedules.placement import Placement
from schedules.task import Loc
from swap.deferred import DeferredCopier
from swap.engine import SwapEngine
from swap.stats import Stats
from swap.tier import OutOfCapacity, Tier
from tests.models import MODELS, reference_train

H2D = "host->device"


@pytest.fixture(autouse=True)
def deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine built here gets the deferred copier, whatever the run's copier."""
    monkeypatch.setenv("HARMONY_COPIER", "deferred")


def _sgd(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def _batches(model: str, n: int = 8, steps: int = 2) -> list[tuple[Any, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [MODELS[model][2](n, g) for _ in range(steps)]


def _trainer(model: str, w: Loc, x: Loc, schedule: str = "harmony", micro: int = 2,
             **kw: Any) -> harmony.Trainer:
    """The model in three packs with W and K at ``w`` and activations at ``x``."""
    factory, loss_fn, _ = MODELS[model]
    t = harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=micro,
                        schedule=schedule, **kw)
    n = len(t.chain.layers)
    bounds = ((0, 1), (1, n - 1), (n - 1, n))
    t.planner.fixed = (bounds, Placement.uniform(3, w, x))
    return t


def _check_equal(model: str, t: harmony.Trainer, batches: list[Any], micro: int = 2) -> None:
    factory, loss_fn, _ = MODELS[model]
    want = reference_train(factory(0.0), loss_fn, _sgd, batches, micro)
    got = t.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
@pytest.mark.parametrize("model", ["mlp", "tuple"])
def test_home_buffers_go_back_after_the_copies_reading_them(model: str, schedule: str) -> None:
    """Activations and gradients homed on the host are read back by copies that compute only
    waits for: their home buffers may return to the pool only once the host knows those
    copies ended (before: released after their swap-out alone)."""
    batches = _batches(model)
    with _trainer(model, Loc.HOST, Loc.HOST, schedule) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None and set(t.plan.placement.x) == {Loc.HOST}
        _check_equal(model, t, batches)


def test_weights_loaded_and_never_read_keep_their_buffer_until_the_copy_ends() -> None:
    """The resident schedule loads X0.m again for a backward that reads the forward's saved
    graph instead: the device buffer must not go back while the copy may still fill it."""
    batches = _batches("transformer")
    with _trainer("transformer", Loc.DEVICE, Loc.DEVICE, "resident") as t:
        for b in batches:
            t.step(*b)
        _check_equal("transformer", t, batches)


def test_a_failed_copy_fails_its_own_step() -> None:
    """A copy that compute only waited for reports its error at a synchronization; the step
    ends with one, so the step that issued the copy fails, not a later one."""
    batches = _batches("mlp")
    with _trainer("mlp", Loc.HOST, Loc.DEVICE) as t:
        t.step(*batches[0])
        copier = t.engine._copier
        assert isinstance(copier, DeferredCopier)
        issue = copier.copy

        def failing(dst: torch.Tensor, src: torch.Tensor, link: str,
                    on_done: Callable[[float], None]) -> Any:
            if link != H2D:
                return issue(dst, src, link, on_done)

            def run() -> None:  # the bytes arrive; the error is reported asynchronously
                dst.copy_(src)
                raise RuntimeError("an illegal memory access was encountered")

            return copier.enqueue(link, dst, src, run, on_done)

        copier.copy = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="illegal memory access"):
            t.step(*batches[1])
        with pytest.raises(RuntimeError, match="load\\(\\) a checkpoint"):
            t.step(*batches[1])  # it had updated packs: the trainer knows the step failed


def _host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ``Tensor.cpu``/``item``/``__float__``/``__bool__`` call: on a GPU, each
    on a computed value blocks the host until the device caught up."""
    calls: list[str] = []
    for name in ("cpu", "item", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
            calls.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_the_host_reads_the_loss_once_per_step_whatever_the_micro_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``.cpu()`` of every micro-batch's loss, a host synchronization each on a GPU."""
    counts = []
    for micro in (4, 1):  # 2 and 8 micro-batches
        batches = _batches("mlp")
        with _trainer("mlp", Loc.HOST, Loc.DEVICE, micro=micro) as t:
            t.step(*batches[0])
            with monkeypatch.context() as m:
                calls = _host_reads(m)
                t.step(*batches[1])
            counts.append(len(calls))
            _check_equal("mlp", t, batches, micro)
    assert counts[0] == counts[1], counts


def test_inputs_and_targets_are_copied_from_staged_host_buffers() -> None:
    """With a pinned host tier (CUDA) the copies to the device read host-tier buffers the
    step filled, never the caller's (pageable) tensors, and give them back once the host
    knows the copies ended. Here the host tier is not pinned; the runtime stages anyway."""
    batches = _batches("tuple")
    with _trainer("tuple", Loc.HOST, Loc.HOST) as t:
        t.step(*batches[0])
        rt = t.runtime
        assert rt is not None
        rt.stage_batch = True
        sources: list[torch.Tensor] = []
        issue = t.engine.copy

        def spy(dst: torch.Tensor, src: torch.Tensor, link: str, kind: str) -> Any:
            sources.append(src)
            return issue(dst, src, link, kind)

        t.engine.copy = spy  # type: ignore[method-assign]
        x, y = batches[1]
        t.step(x, y)
        callers = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
        assert sources and not callers & {s.untyped_storage().data_ptr() for s in sources}
        assert t.stats.kind_bytes(H2D, "T") == y.numel() * y.element_size()
        assert not rt.targets
        _check_equal("tuple", t, batches)


def test_staging_that_does_not_fit_gives_back_what_it_staged() -> None:
    batches = _batches("mlp")
    with _trainer("mlp", Loc.HOST, Loc.DEVICE) as t:
        t.step(*batches[0])
        rt = t.runtime
        assert rt is not None
        rt.stage_batch = True
        host = t.tiers[Loc.HOST]
        host.drain()
        before = host.used
        x, y = batches[1]
        host.capacity = before + x.numel() * x.element_size()  # the inputs fit, not the targets
        with pytest.raises(OutOfCapacity, match="targets of micro-batch 0"):
            t.step(x, y)
        host.drain()
        assert host.used == before


def _bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                         nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("home", [Loc.HOST, Loc.NVME])
def test_buffers_a_forward_changes_go_home_through_the_engine(home: Loc,
                                                              tmp_path: Path) -> None:
    """BatchNorm's running statistics reach the home copy (or, for NVMe, the update's
    chunk) through asynchronous engine copies, waited for where they are used next; before,
    two blocking copies per forward."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(3)]
    want = reference_train(_bn(), nn.functional.cross_entropy, _sgd, batches, 4)
    t = harmony.Trainer(_bn(), nn.functional.cross_entropy, optimizer=_sgd, micro_batch_size=4,
                        nvme_dir=tmp_path if home is Loc.NVME else None)
    t.planner.fixed = (((0, 3), (3, 6), (6, 7)), Placement.uniform(3, home, Loc.HOST))
    with t:
        for b in batches:
            t.step(*b)
        assert t.stats.kind_bytes("device->host", "W") > 0  # the buffers' copies
        got = t.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_recorded_task_times_come_from_the_device_clock(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """On CUDA the host's clock says when a task was issued: record_step reads timing
    events recorded on the compute stream, after the step's synchronization."""
    from harmony.runtime import runtime, timeline

    recorded: list[float] = []

    class Event:
        def __init__(self) -> None:
            self.at = float(len(recorded))

        def record(self) -> None:
            recorded.append(self.at)

        def elapsed_time(self, other: Event) -> float:  # milliseconds, as CUDA's
            return (other.at - self.at) * 1000.0

    monkeypatch.setattr(runtime, "clock_for", lambda device: timeline.EventClock(Event))
    batches = _batches("mlp")
    with _trainer("mlp", Loc.HOST, Loc.DEVICE) as t:
        t.record_step(*batches[0], tmp_path / "step.json")
    tasks = json.loads((tmp_path / "step.json").read_text())["tasks"]
    assert len(recorded) == 2 * len(tasks) + 1
    assert [(d["start"], d["end"]) for d in tasks] == [
        (float(2 * i + 1), float(2 * i + 2)) for i in range(len(tasks))]


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[Group]:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous",
                                         rank=0, world_size=1)
    yield Group(0, 1, 0, 1, "gloo", True)
    torch.distributed.destroy_process_group()


def test_a_broadcast_source_goes_back_after_the_copy_reading_it(one_rank: Group) -> None:
    """Under NCCL a host buffer travels through a device buffer: the owner's host copy goes
    back to its pool only once the copy reading it is known to have ended (before: a
    stream-ordered ``.to(device)`` the pool knew nothing of)."""
    from harmony.parallel.data_parallel import DataParallel

    engine = SwapEngine(torch.device("cpu"), Stats())
    host = Tier("host", torch.device("cpu"), 1 << 20)
    engine.watch([host])
    dp = DataParallel(torch.device("cpu"), one_rank, shard=True)
    dp.via_device = True  # (as under NCCL)
    buf = host.allocate(64, "weights of pack 1")
    buf.copy_(torch.arange(64, dtype=torch.uint8))
    reads: list[Any] = []

    def sent(read: Any) -> None:
        reads.append(read)
        host.release(buf, after=read)

    dp.start_broadcast(1, 0, buf, engine, sent)
    dp.finish_broadcast(1)
    assert reads and reads[0] is not None and not reads[0].done()
    assert engine.stats.kind_bytes(H2D, "W") == 64
    assert host.used == 64  # pending: back once the copy is known to have ended
    engine.synchronize_all()
    host.allocate(32, "next")
    assert host.used == 32
    engine.close()
