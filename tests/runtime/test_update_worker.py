"""Optimizer steps of host-homed packs overlapped with the next pack's backward
(Trainer(overlap_updates=True)): exact, really overlapped, accounted and predicted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from schedules.task import Loc
from tests.models import MODELS, reference_train, tied_transformer, training_state_bytes


def adamw(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _batches(model: str, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    return [MODELS[model][2](7, g) for _ in range(n)]


def _trainer(model: Callable[[], nn.Module], loss: Callable, opt: Callable = adamw,
             **kwargs: object) -> harmony.Trainer:
    state = training_state_bytes(model(), 8)
    return harmony.Trainer(model(), loss, optimizer=opt, micro_batch_size=3,  # type: ignore[arg-type]
                           device_memory=state // 2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["transformer", "tuple"])
@pytest.mark.parametrize("schedule,clip", [("harmony", None), ("per-microbatch", None),
                                           ("harmony", 0.05)])
def test_overlapped_updates_equal_pytorch(model: str, schedule: str, clip: float | None
                                          ) -> None:
    factory, loss_fn, _ = MODELS[model]
    batches = _batches(model)
    with _trainer(lambda: factory(0.0), loss_fn, schedule=schedule, clip_grad_norm=clip,
                  overlap_updates=True) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None and Loc.HOST in t.plan.placement.k
        assert t.stats.busy_seconds["update"] > 0  # the steps ran on the worker
        got = t.state_dict()
    if clip is None:
        want = reference_train(factory(0.0), loss_fn, adamw, batches, 3)
    else:  # (clipping: the same run without overlap, itself equal to clip_grad_norm_)
        with _trainer(lambda: factory(0.0), loss_fn, schedule=schedule,
                      clip_grad_norm=clip) as plain:
            for b in batches:
                plain.step(*b)
            want = plain.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("case", ["bf16", "tied"])
def test_overlapped_equals_serial(case: str) -> None:
    """Mixed precision (the step refreshes W from the masters on the worker) and tied weights
    (the copies are refreshed when the owner's step is joined): overlap changes no bit."""
    model = "transformer"
    factory = (lambda: tied_transformer()) if case == "tied" else (lambda: MODELS[model][0](0.0))
    precision = "bf16" if case == "bf16" else "fp32"
    runs = []
    for overlap in (True, False):
        with _trainer(factory, MODELS[model][1], precision=precision,
                      overlap_updates=overlap) as t:
            for b in _batches(model):
                t.step(*b)
            runs.append(t.state_dict())
    for k in runs[1]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_overlap_beside_nvme_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host-homed packs' steps overlap while NVMe-homed packs update in line (in chunks)."""
    # (the planner's first fitting family, some packs on the host and the rest on NVMe: a
    # clearly faster all-NVMe plan, or moving the host packs onto the device, must not
    # replace it here)
    monkeypatch.setattr(harmony.planning.planner, "CLEARLY_FASTER", 1.0)
    monkeypatch.setattr(harmony.planning.planner, "refine", lambda best, fitting: best)
    factory, loss_fn, _ = MODELS["transformer"]
    state = training_state_bytes(factory(0.0), 8)
    batches = _batches("transformer")
    with _trainer(lambda: factory(0.0), loss_fn, nvme_dir=tmp_path, host_memory=state // 2,
                  update_chunk="16KiB", overlap_updates=True) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None and {Loc.HOST, Loc.NVME} <= set(t.plan.placement.k)
        predicted, accounted = t.plan.predicted.peak[Loc.HOST], t.stats.peak_bytes["host"]
        assert accounted <= state // 2
        assert abs(accounted - predicted) <= 0.05 * predicted, (accounted, predicted)
        got = t.state_dict()
    want = reference_train(factory(0.0), loss_fn, adamw, batches, 3)
    for k in want:
        assert torch.equal(got[k], want[k]), k


class Recorder:
    """An AdamW whose step sleeps, recording when and on which thread each pack's step ran
    (the trainer calls the factory once to probe the state's size, then once per pack in
    pack order)."""

    def __init__(self, sleep: float) -> None:
        self.sleep, self.packs = sleep, -1
        self.steps: list[tuple[int, str, float, float]] = []  # (pack, thread, start, end)

    def __call__(self, ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = adamw(ps)
        step, pack = opt.step, self.packs
        self.packs += 1

        def slow(*args: object, **kwargs: object) -> None:
            t0 = time.perf_counter()
            time.sleep(self.sleep)
            step(*args, **kwargs)
            self.steps.append((pack, threading.current_thread().name, t0, time.perf_counter()))

        opt.step = slow  # type: ignore[method-assign]
        return opt


def test_the_step_runs_while_the_next_pack_computes() -> None:
    factory, loss_fn, _ = MODELS["transformer"]
    record = Recorder(sleep=0.2)
    with _trainer(lambda: factory(0.0), loss_fn, opt=record, overlap_updates=True) as t:
        batches = _batches("transformer", 2)
        t.step(*batches[0])
        record.steps.clear()
        starts: list[float] = []  # the layers' forward calls (the backward recomputes them)
        for layer in t.chain.layers:
            layer.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        stall = t.stats.stall_seconds["update"]
        t.step(*batches[1])
        assert t.plan is not None
        host = [p for p, loc in enumerate(t.plan.placement.k) if loc is Loc.HOST]
        behind = [(a, b) for p, name, a, b in record.steps if p in host]
        assert len(host) >= 2 and len(behind) == len(host)
        # the host-homed packs' steps ran on the worker, the others' on the main thread
        assert all(name.startswith("harmony-update") == (p in host)
                   for p, name, _, _ in record.steps)
        # some layer's computation began while a host-homed pack's step was still sleeping
        assert any(a < s < b for a, b in behind for s in starts)
        # and the thread then waited for the step: the stall is counted
        assert t.stats.stall_seconds["update"] - stall > 0.1


def test_gradients_held_until_the_step_ends_are_predicted() -> None:
    """The host keeps an overlapped pack's gradients until its step is joined; the planner
    predicts the host peak that gives (within 5% of the accounted one)."""
    factory, loss_fn, _ = MODELS["transformer"]
    peaks = {}
    for overlap in (False, True):
        with _trainer(lambda: factory(0.0), loss_fn, overlap_updates=overlap) as t:
            for b in _batches("transformer", 2):
                t.step(*b)
            assert t.plan is not None
            predicted, accounted = t.plan.predicted.peak[Loc.HOST], t.stats.peak_bytes["host"]
            assert abs(accounted - predicted) <= 0.05 * predicted, (overlap, accounted, predicted)
            peaks[overlap] = predicted
    assert peaks[True] > peaks[False]


def test_a_failing_overlapped_step_fails_the_step() -> None:
    factory, loss_fn, _ = MODELS["transformer"]
    armed = threading.Event()

    def failing(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = adamw(ps)
        step = opt.step

        def maybe(*args: object, **kwargs: object) -> None:
            if armed.is_set() and threading.current_thread().name.startswith("harmony-update"):
                raise RuntimeError("injected failure in an optimizer step")
            step(*args, **kwargs)

        opt.step = maybe  # type: ignore[method-assign]
        return opt

    batches = _batches("transformer", 3)
    with _trainer(lambda: factory(0.0), loss_fn, opt=failing, overlap_updates=True) as t:
        t.step(*batches[0])
        armed.set()  # the next step on the worker raises; the step raises it when joined
        with pytest.raises(RuntimeError, match="injected failure"):
            t.step(*batches[1])
        assert t.step_count == 1
        with pytest.raises(RuntimeError, match="load"):  # no training on mixed weights
            t.step(*batches[2])


def test_bad_overlap_updates_refused() -> None:
    factory, loss_fn, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match="overlap_updates='yes' must be True or False"):
        harmony.Trainer(factory(0.0), loss_fn, overlap_updates="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not available with shard_optimizer=True"):
        harmony.Trainer(factory(0.0), loss_fn, overlap_updates=True, parallel="data",
                        shard_optimizer=True)
