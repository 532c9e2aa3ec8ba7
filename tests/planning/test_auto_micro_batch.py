"""micro_batch_size='auto': the largest micro-batch size the budgets allow."""

from __future__ import annotations

import pytest
import torch

import harmony
from harmony.planning.planner import largest_micro_batch
from tests.models import MODELS, reference_train, training_state_bytes


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _batches(n: int = 12, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [MODELS["transformer"][2](n, g) for _ in range(steps)]


def _least_device_memory(mbs: int) -> int:
    factory, loss_fn, _ = MODELS["transformer"]
    t = harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=mbs,
                        device_memory=1 << 30)
    t.device_memory = 1  # past the construction-time check
    with t, pytest.raises(harmony.InfeasiblePlan) as err:
        t.step(*_batches()[0])
    return err.value.device_needed


@pytest.mark.parametrize("budget", ["none", "between"])
def test_auto_takes_the_largest_size_that_fits_and_stays_exact(
        budget: str, monkeypatch: pytest.MonkeyPatch) -> None:
    profiled: list[int] = []
    original = harmony.Trainer._profile

    def spy(self: harmony.Trainer, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        profiled.append(y.shape[0])
        original(self, x, y)


    factory, loss_fn, _ = MODELS["transformer"]
    limit = None
    if budget == "between":  # micro-batches of 4 fit, of 8 (and 12) do not
        limit = (_least_device_memory(4) + _least_device_memory(8)) // 2
        assert _least_device_memory(4) <= limit < _least_device_memory(8)
    batches = _batches()
    monkeypatch.setattr(harmony.Trainer, "_profile", spy)
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size="auto",
                         device_memory=limit) as t:
        for x, y in batches:
            t.step(x, y)
        assert profiled == [2]  # once, on two samples: the first step builds from that plan
        want_size = 12 if limit is None else 4
        assert t.micro_batch_size_used == want_size
        assert t.plan is not None and t.plan.schedule.micro_batches == 12 // want_size
        if limit is not None:
            assert 0 < t.stats.peak_bytes["device"] <= limit
        got = t.state_dict()
    want = reference_train(factory(0.0), loss_fn, _adamw, batches, want_size)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_auto_nothing_fits_raises_the_smallest_sizes_error() -> None:
    factory, loss_fn, _ = MODELS["transformer"]
    state = training_state_bytes(factory(0.0), 8)
    t = harmony.Trainer(factory(0.0), loss_fn, micro_batch_size="auto", device_memory=state)
    t.device_memory = 1
    with t, pytest.raises(harmony.InfeasiblePlan, match="micro_batch_size=1"):
        t.step(*_batches()[0])


def test_largest_micro_batch_order() -> None:
    tried: list[list[int]] = []

    def plan_for(sizes: list[int]) -> object:
        tried.append(sizes)
        if max(sizes) > 3:
            raise harmony.InfeasiblePlan("too big", 0, 0)
        return "plan"

    assert largest_micro_batch(10, plan_for) == (2, "plan")  # type: ignore[arg-type]
    assert tried == [[10], [8, 2], [4, 4, 2], [2, 2, 2, 2, 2]]


@pytest.mark.parametrize("bad", [0, -1, "big", 2.5, True])
def test_bad_micro_batch_size(bad: object) -> None:
    factory, loss_fn, _ = MODELS["transformer"]
    with pytest.raises(ValueError, match=r"micro_batch_size=.* must be a positive int or 'auto'"):
        harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=bad)  # type: ignore[arg-type]


def test_auto_chooses_again_under_budgets_set_between_steps() -> None:
    """A device budget lowered between steps: "auto" takes the size that fits it (the size
    chosen under the first budget, kept per batch shape, no longer does), and training equals
    plain accumulation over each step's size."""
    factory, loss_fn, _ = MODELS["transformer"]
    limit = (_least_device_memory(4) + _least_device_memory(8)) // 2
    batches = _batches()
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size="auto",
                         device_memory=None) as t:
        t.step(*batches[0])
        assert t.micro_batch_size_used == 12
        t.device_memory = limit
        for x, y in batches[1:]:
            t.step(x, y)
        assert t.micro_batch_size_used == 4
        got = t.state_dict()
    net = factory(0.0)
    opt = _adamw(list(net.parameters()))
    for i, (x, y) in enumerate(batches):
        size = 12 if i == 0 else 4
        for xm, ym in zip(x.split(size), y.split(size)):
            (loss_fn(net(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    for k, v in net.state_dict().items():
        assert torch.equal(got[k], v), k
