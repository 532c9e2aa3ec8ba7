"""Buffers a forward changes (BatchNorm's running statistics) are updated once per
micro-batch, as in plain PyTorch, whatever the schedule recomputes and wherever the pack
lives (harmony.model.buffers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from harmony.planning.planner import Plan
from schedules.placement import Placement
from schedules.task import Loc
from tests.models import reference_train


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                         nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3))


def _opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]


def _plan_with(schedule: str, w: Loc, x: Loc) -> Plan:
    """Three packs of the model with W and K at ``w`` and activations at ``x``."""
    with harmony.Trainer(_model(), nn.functional.cross_entropy, micro_batch_size=4,
                         device_memory=12000, schedule=schedule) as t:
        t.step(*_batches()[0])
        p = t.plan
    assert p is not None and len(p.bounds) > 1
    placement = Placement.uniform(len(p.bounds), w, x)
    return Plan(p.bounds, p.schedule.with_tasks(list(p.schedule.tasks), placement, 0), p.sizes,
                p.predicted)


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
@pytest.mark.parametrize("w,x,chunk", [(Loc.DEVICE, Loc.DEVICE, None), (Loc.HOST, Loc.DEVICE, None),
                                       (Loc.HOST, Loc.HOST, None), (Loc.NVME, Loc.HOST, None),
                                       (Loc.NVME, Loc.HOST, 1024)])  # (chunks: the buffers last)
def test_running_statistics_equal_pytorch(schedule: str, w: Loc, x: Loc, chunk: int | None,
                                          tmp_path: Path) -> None:
    batches = _batches()
    want = reference_train(_model(), nn.functional.cross_entropy, _opt, batches, 4)
    with harmony.Trainer(_model(), nn.functional.cross_entropy, optimizer=_opt,
                         micro_batch_size=4, plan=_plan_with(schedule, w, x),
                         nvme_dir=tmp_path if w is Loc.NVME else None, update_chunk=chunk) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None and t.plan.placement.w[0] is w
        assert t.runtime is not None
        assert (max(len(p.chunks) for p in t.runtime.packs) > 1) == (chunk is not None)
        assert t.plan.schedule.recompute  # the forward runs twice: once must not count
        got = t.state_dict()
    assert int(got["1.num_batches_tracked"]) == 2 * len(batches)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, got[k], want[k])


def test_profiling_leaves_running_statistics_alone() -> None:
    """The first step profiles every layer (several forward passes) before training."""
    with harmony.Trainer(_model(), nn.functional.cross_entropy, micro_batch_size=8,
                         schedule="resident") as t:
        t.step(*_batches()[0])
        got = t.state_dict()
    assert int(got["1.num_batches_tracked"]) == 1


class _Scaled(nn.Module):
    """A layer with a buffer no forward changes (like position ids or a causal mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)
        self.register_buffer("scale", torch.full((32,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_only_buffers_a_forward_changes_are_carried() -> None:
    """The profile tells the runtime which buffers change, so constant ones cost nothing per
    micro-batch (no copy home after each forward, no snapshot around each recompute)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), _Scaled(), nn.Tanh(),
                          nn.Linear(32, 3))
    with harmony.Trainer(model, nn.functional.cross_entropy, micro_batch_size=4,
                         device_memory=16000) as t:
        t.step(*_batches()[0])
        assert t.plan is not None and len(t.plan.bounds) > 1  # (packs swap)
        rt = t.runtime
        assert rt is not None and rt.changing is not None
        carried = {e.name for p in range(len(rt.packs)) for e in rt.changing_buffers(p)}
        every = {e.name for pack in rt.packs for e in pack.layout.buffers}
    assert carried == {"running_mean", "running_var", "num_batches_tracked"}
    assert "scale" in every
