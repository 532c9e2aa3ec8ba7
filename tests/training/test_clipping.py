"""Global-norm gradient clipping across packs equals clip_grad_norm_ on the plain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harmony
from schedules.task import Loc, Op
from tests.models import MODELS, layers_of, training_state_bytes


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _reference(model: str, batches: list, mbs: int, max_norm: float) -> dict[str, torch.Tensor]:
    factory, loss_fn, _ = MODELS[model]
    net = factory(0.0)
    layers = layers_of(net)
    opt = _adamw(list(net.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            h: object = xm
            for layer in layers:
                h = layer(*h) if isinstance(h, tuple) else layer(h)
            (loss_fn(h, ym) * (ym.shape[0] / y.shape[0])).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("model", ["transformer", "tuple"])
@pytest.mark.parametrize("placement", ["device", "host", "nvme"])
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_clipping_equals_clip_grad_norm(tmp_path: Path, model: str, placement: str,
                                        schedule: str) -> None:
    factory, loss_fn, data = MODELS[model]
    g = torch.Generator().manual_seed(8)
    batches = [data(7, g) for _ in range(3)]
    state = training_state_bytes(factory(0.0), 8)
    kw: dict = {"device": {}, "host": {"device_memory": state // 2},
                "nvme": {"device_memory": state // 2, "nvme_dir": tmp_path}}[placement]
    if placement == "nvme":
        # Clipping keeps every pack's gradients on the host until the norm is known: ask for
        # the least host memory that allows, which puts the rest on NVMe.
        probe = harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                                schedule=schedule, clip_grad_norm=0.05, host_memory=1, **kw)
        with probe, pytest.raises(harmony.InfeasiblePlan) as err:
            probe.step(*batches[0])
        kw["host_memory"] = err.value.host_needed
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                         schedule=schedule, clip_grad_norm=0.05, **kw) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None
        tasks = t.plan.schedule.compute_tasks()
        first_update = next(i for i, task in enumerate(tasks) if task.op is Op.UPD)
        assert all(task.op is Op.UPD for task in tasks[first_update:])  # the schedule says so
        if placement == "nvme":
            assert Loc.NVME in t.plan.placement.w
        assert t.runtime is not None and t.runtime.grad_norm > 0.05  # clipping was active
        got = t.state_dict()
    want = _reference(model, batches, 3, 0.05)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("value", [0, -1.0, "1", True])
def test_bad_clip_value(value: object) -> None:
    factory, loss_fn, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match="clip_grad_norm="):
        harmony.Trainer(factory(0.0), loss_fn, clip_grad_norm=value)  # type: ignore[arg-type]
