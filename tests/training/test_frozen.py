"""Frozen layers and packs with nothing to train (fine-tuning a part of a model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import harmony


def _sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, 2)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 4))
    for p in [*m[0].parameters(), *m[2].parameters()]:
        p.requires_grad_(False)
    return m


def _opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    # the usual fine-tuning idiom; harmony hands each pack only its trainable parameters
    return torch.optim.AdamW([p for p in ps if p.requires_grad], lr=1e-2)


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


def _trainer(schedule: str, **kw: object) -> harmony.Trainer:
    return harmony.Trainer(_model(), nn.functional.mse_loss, optimizer=_opt, micro_batch_size=2,
                           device_memory=45000, schedule=schedule, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_packs_with_nothing_to_train_equal_pytorch(schedule: str, tmp_path: Path) -> None:
    batches = _batches()
    with _trainer(schedule, lr_scheduler=_sched) as t:
        for x, y in batches[:2]:
            t.step(x, y)
        plan = t.plan
        assert plan is not None and len(plan.bounds) > 2
        frozen = [p for p, (a, b) in enumerate(plan.bounds) if b <= 4]
        assert frozen, plan.describe(t.chain.names)  # a pack of frozen layers only
        t.save(tmp_path / "ckpt")
    with _trainer(schedule, lr_scheduler=_sched) as t:
        t.load(tmp_path / "ckpt")
        for x, y in batches[2:]:
            t.step(x, y)
        got = t.state_dict()
    want = _reference(batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["0.weight"], _model().state_dict()["0.weight"])  # frozen: unchanged


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    net = _model()
    opt = _opt(list(net.parameters()))
    sched = _sched(opt)
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (nn.functional.mse_loss(net(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
