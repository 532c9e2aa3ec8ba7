"""A saved plan (harmony report --json) drives the Trainer instead of its own planning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import harmony
from harmony.tools.report import plan_to_json
from tests.models import MODELS, reference_train, training_state_bytes


def _sgd(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def _case(model: str, samples: int, steps: int) -> tuple[Any, Any, list[Any], int]:
    """The model's factory and loss, seeded batches, and a device budget of half its state."""
    factory, loss_fn, data = MODELS[model]
    g = torch.Generator().manual_seed(6)
    batches = [data(samples, g) for _ in range(steps)]
    return factory, loss_fn, batches, training_state_bytes(factory(0.0), 4) // 2


def test_saved_plan_is_followed_and_exact(tmp_path: Path) -> None:
    factory, loss_fn, batches, budget = _case("transformer", 6, 3)
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                         device_memory=budget, schedule="per-microbatch", prefetch=0) as first:
        first.step(*batches[0])
        assert first.plan is not None
        path = tmp_path / "plan.json"
        path.write_text(json.dumps({"plan": plan_to_json(first.plan)}))
        saved = first.plan
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                         device_memory=budget, plan=path) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None
        assert t.plan.bounds == saved.bounds and t.plan.placement == saved.placement
        assert t.plan.schedule.name == "per-microbatch" and t.plan.schedule.prefetch == 0
        got = t.state_dict()
    want = reference_train(factory(0.0), loss_fn, _sgd, batches, 2)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_plan_of_another_model_or_garbage_refused(tmp_path: Path) -> None:
    factory, loss_fn, data = MODELS["mlp"]
    with harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2) as t:
        t.step(*data(4, torch.Generator().manual_seed(0)))
        assert t.plan is not None
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan_to_json(t.plan)))
    other, other_loss, _ = MODELS["transformer"]
    with pytest.raises(ValueError, match="covers .* layers but the model's chain has"):
        harmony.Trainer(other(0.0), other_loss, plan=path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a plan written by harmony report"):
        harmony.Trainer(factory(0.0), loss_fn, plan=bad)


def test_saved_plan_keeps_its_forward_groups(tmp_path: Path) -> None:
    factory, loss_fn, batches, budget = _case("mlp", 16, 2)
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                         forward_micro_batch_size=8, device_memory=budget) as first:
        for b in batches:
            first.step(*b)
        assert first.plan is not None and first.plan.forward_group == 4
        path = tmp_path / "plan.json"
        path.write_text(json.dumps({"plan": plan_to_json(first.plan)}))
        want = first.state_dict()
        tasks = str(first.plan.schedule)
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                         device_memory=budget, plan=path) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None and t.plan.forward_group == 4 and str(t.plan.schedule) == tasks
        got = t.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=r"forward_micro_batch_size=4 but plan=.* runs forwards "
                                         r"over 4 micro-batch\(es\); drop one of the two"):
        harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2, forward_micro_batch_size=4,
                        plan=path)
