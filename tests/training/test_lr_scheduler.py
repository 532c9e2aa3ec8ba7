"""Learning-rate schedulers: one per pack, in step with one over the whole model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harmony
from tests.models import MODELS, reference_train, training_state_bytes


def _sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _reference(batches: list) -> dict[str, torch.Tensor]:
    factory, loss_fn, _ = MODELS["transformer"]
    net = factory(0.0)
    opt = _adamw(list(net.parameters()))
    sched = _sched(opt)
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (loss_fn(net(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _trainer() -> harmony.Trainer:
    factory, loss_fn, _ = MODELS["transformer"]
    return harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=2,
                           device_memory=training_state_bytes(factory(0.0), 8) // 2,
                           lr_scheduler=_sched)


def _batches(n: int = 4) -> list:
    g = torch.Generator().manual_seed(12)
    return [MODELS["transformer"][2](5, g) for _ in range(n)]


def test_schedule_follows_one_scheduler_over_the_model() -> None:
    batches = _batches()
    with _trainer() as t:
        for b in batches:
            t.step(*b)
        assert len(t.lr_schedulers) == len(t.plan.bounds) > 1  # type: ignore[union-attr]
        assert {s.get_last_lr()[0] for s in t.lr_schedulers} == {1e-2 / 5}
        got = t.state_dict()
    want = _reference(batches)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_scheduler_state_resumes(tmp_path: Path) -> None:
    batches = _batches()
    with _trainer() as first:
        for b in batches[:2]:
            first.step(*b)
        first.save(tmp_path)
    with _trainer() as resumed:
        resumed.load(tmp_path)
        for b in batches[2:]:
            resumed.step(*b)
        got = resumed.state_dict()
    want = _reference(batches)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_reference_helper_is_the_plain_loop() -> None:
    """Without a scheduler the reference above is tests.models' plain loop."""
    factory, loss_fn, _ = MODELS["transformer"]
    batches = _batches(2)
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=2) as t:
        for b in batches:
            t.step(*b)
        got = t.state_dict()
    want = reference_train(factory(0.0), loss_fn, _adamw, batches, 2)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(AssertionError):
        assert all(torch.equal(got[k], v) for k, v in _reference(batches).items())
