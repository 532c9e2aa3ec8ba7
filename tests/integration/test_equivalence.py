"""Exactness: harmony's weights equal plain PyTorch's gradient accumulation, bit for bit.

Every schedule, with everything on the device and with budgets that force swapping, for three
models, 1 / 3 / uneven micro-batches, SGD with momentum and AdamW, after 3 steps. The operations
are the same as plain PyTorch's, in the same order (per-pack backward passes the same gradient
tensors along, and gradients accumulate micro-batch by micro-batch in the same order), so the
comparison is ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

import pytest
import torch

import harmony
from schedules.task import Loc
from tests.models import MODELS, reference_train, training_state_bytes

OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 4),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 8),
}
# (batch size, micro-batch size): one micro-batch, three equal ones, uneven (last smaller)
BATCHES = {"one": (6, 6), "three": (6, 2), "uneven": (7, 3)}


def _batches(model: str, batch: int, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [MODELS[model][2](batch, g) for _ in range(steps)]


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


def _train(model: str, opt: str, batch: str, schedule: str, budget: int | None,
           dropout: float = 0.0) -> tuple[harmony.Trainer, dict[str, torch.Tensor]]:
    factory, loss_fn, _ = MODELS[model]
    make_opt = OPTIMIZERS[opt][0]
    n, mbs = BATCHES[batch]
    trainer = harmony.Trainer(factory(dropout), loss_fn, optimizer=make_opt,
                              micro_batch_size=mbs, device_memory=budget, schedule=schedule)
    for x, y in _batches(model, n):
        trainer.step(x, y)
    return trainer, trainer.state_dict()


def _reference(model: str, opt: str, batch: str, dropout: float = 0.0) -> dict[str, torch.Tensor]:
    factory, loss_fn, _ = MODELS[model]
    n, mbs = BATCHES[batch]
    return reference_train(factory(dropout), loss_fn, OPTIMIZERS[opt][0], _batches(model, n), mbs)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch", "resident"])
def test_all_on_device_equals_pytorch(model: str, opt: str, batch: str, schedule: str) -> None:
    trainer, got = _train(model, opt, batch, schedule, None)
    with trainer:
        assert trainer.plan is not None and trainer.plan.placement.w[0] is Loc.DEVICE
        _assert_same(got, _reference(model, opt, batch))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
@pytest.mark.parametrize("budget", ["half", "tightest"])
def test_swapping_equals_pytorch(model: str, opt: str, batch: str, schedule: str,
                                 budget: str) -> None:
    """Budgets below the training state force weights and optimizer state off the device:
    half of it, and the least device memory any plan needs (activations go to the host too)."""
    limit = int(training_state_bytes(MODELS[model][0](0.0), OPTIMIZERS[opt][1]) * 0.5)
    if budget == "tightest":
        limit = _least_device_memory(model, opt, batch, schedule)
    trainer, got = _train(model, opt, batch, schedule, limit)
    with trainer:
        plan = trainer.plan
        assert plan is not None
        assert Loc.HOST in plan.placement.w, plan.describe(trainer.chain.names)
        if budget == "tightest":
            assert all(loc is Loc.HOST for loc in plan.placement.w)
        assert len(plan.bounds) > 1
        assert 0 < trainer.stats.peak_bytes["device"] <= limit
        if budget == "tightest" and schedule == "harmony" and BATCHES[batch][0] > BATCHES[batch][1]:
            assert plan.placement.x[-1] is Loc.HOST, plan.describe(trainer.chain.names)
        _assert_same(got, _reference(model, opt, batch))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_some_packs_resident_others_swapped_equals_pytorch(model: str, schedule: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    """A budget that holds part of the training state keeps some packs wholly on the device
    (no weight traffic) while the others swap; the result is still plain PyTorch's."""
    # The placement under test is the first the planner tries that fits (resident packs, the
    # least traffic); a faster one of the same tier (fewer packs, all swapped) must not win.
    monkeypatch.setattr(harmony.planning.planner, "CLEARLY_FASTER", 1.0)
    limit = int(training_state_bytes(MODELS[model][0](0.0), OPTIMIZERS["adamw"][1]) * 0.75)
    trainer, got = _train(model, "adamw", "three", schedule, limit)
    with trainer:
        plan = trainer.plan
        assert plan is not None
        assert {Loc.DEVICE, Loc.HOST} <= set(plan.placement.w), plan.describe(trainer.chain.names)
        assert 0 < trainer.stats.peak_bytes["device"] <= limit
        swapped = sum(plan.sizes.w[p] for p, loc in enumerate(plan.placement.w)
                      if loc is Loc.HOST)
        # only the swapped packs' weights cross the link: once or twice each per step
        # (harmony), per micro-batch (the baseline)
        w_moved = plan.predicted.bytes_by_kind[("host->device", "W")]
        loads = 2 if schedule == "harmony" else 2 * plan.schedule.micro_batches
        assert swapped <= w_moved <= loads * swapped
        steps = len(_batches(model, BATCHES["three"][0]))
        assert trainer.stats.bytes_moved["host->device"] == \
            steps * plan.predicted.bytes_moved["host->device"]
        _assert_same(got, _reference(model, "adamw", "three"))


def _least_device_memory(model: str, opt: str, batch: str, schedule: str) -> int:
    factory, loss_fn, data = MODELS[model]
    n, mbs = BATCHES[batch]
    trainer = harmony.Trainer(factory(0.0), loss_fn, optimizer=OPTIMIZERS[opt][0],
                              micro_batch_size=mbs, device_memory=1 << 20, schedule=schedule)
    trainer.device_memory = 1  # past the per-layer check made at construction
    with trainer, pytest.raises(harmony.InfeasiblePlan) as err:
        trainer.step(*data(n, torch.Generator().manual_seed(1)))
    return err.value.device_needed


@pytest.mark.parametrize("repeat", range(4))
def test_passed_through_tensors_survive_buffer_reuse(repeat: int) -> None:
    """The tuple model passes its mask through every layer: the output must not alias the
    input's device buffer, which goes back to the pool (and is reused) when the input is
    freed. Repeated, because reuse depends on when copies finish."""
    limit = _least_device_memory("tuple", "sgd", "uneven", "harmony")
    trainer, got = _train("tuple", "sgd", "uneven", "harmony", limit)
    with trainer:
        assert trainer.plan is not None and trainer.plan.placement.x[-1] is Loc.HOST
    _assert_same(got, _reference("tuple", "sgd", "uneven"))


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_changing_shapes_between_steps(schedule: str) -> None:
    """Sequence length and batch size change from step to step: each new shape re-plans on
    the same packs (re-profiling with the weights brought home), or, when those packs leave
    too little room, on new packs the training state moves to; still exact."""
    from tests.models import TinyTransformer, cross_entropy_tokens

    def make() -> torch.nn.Module:
        return TinyTransformer(length=16)

    g = torch.Generator().manual_seed(3)
    batches = [(x, x.roll(-1, 1)) for x in (torch.randint(0, 11, (n, t), generator=g)
                                            for n, t in ((4, 8), (4, 12), (5, 8), (3, 16)))]
    budget = training_state_bytes(make(), 8) // 2
    with harmony.Trainer(make(), cross_entropy_tokens, optimizer=OPTIMIZERS["adamw"][0],
                         micro_batch_size=2, device_memory=budget, schedule=schedule) as t:
        for b in batches:
            t.step(*b)
            assert t.plan is not None and Loc.HOST in t.plan.placement.w
            assert t.stats.peak_bytes["device"] <= budget
        got = t.state_dict()
    want = reference_train(make(), cross_entropy_tokens, OPTIMIZERS["adamw"][0], batches, 2)
    _assert_same(got, want)
