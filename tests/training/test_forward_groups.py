"""Training with forward groups (``forward_micro_batch_size``) against plain PyTorch.

A forward group runs one forward over several micro-batches and backward still recomputes per
micro-batch, so the gradients are those of the micro-batches. The forward's matrix products
run over more rows, which this CPU's kernels round differently (about 1e-7 relative: they
block the rows otherwise), so the comparison with plain PyTorch's accumulation over micro-batches
is a tolerance, with SGD: it carries rounding differences along linearly, while AdamW divides
each update by the gradient's running scale and so turns differences in gradients that are
rounding noise around zero into differences of the learning rate's size. The exact check is
against the same computation written in plain PyTorch (``grouped_reference_train``: grouped
forwards without grad, a recompute per micro-batch), bit for bit, for SGD and AdamW.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from schedules.task import Loc, Op
from tests.models import (
    MODELS,
    assert_weights_close,
    grouped_reference_train,
    reference_train,
    training_state_bytes,
)

OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 4),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 8),
}
STEPS = 4
RTOL = 1e-6  # SGD, 4 steps: seen at most 1.5e-7 (mlp), 0 (transformer), 1e-7 (tuple)


def _batches(model: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [MODELS[model][2](n, g) for _ in range(STEPS)]


def _budgets(model: str, opt: str, place: str, tmp_path: Path) -> dict[str, object]:
    """device/host budgets (and an NVMe directory) for a placement: half the training state
    on the device; NVMe homes for W, K (and X) under half of it on the host; the least device
    memory any plan with these forward groups needs (activations leave the device too)."""
    state = training_state_bytes(MODELS[model][0](0.0), OPTIMIZERS[opt][1])
    if place == "half":
        return {"device_memory": state // 2}
    if place == "nvme":
        return {"device_memory": state // 2, "host_memory": state // 2,
                "nvme_dir": str(tmp_path)}
    factory, loss_fn, _ = MODELS[model]
    probe = harmony.Trainer(factory(0.0), loss_fn, optimizer=OPTIMIZERS[opt][0],
                            micro_batch_size=2, forward_micro_batch_size=8,
                            device_memory=1 << 20)
    probe.device_memory = 1  # past the per-layer check made at construction
    with probe, pytest.raises(harmony.InfeasiblePlan) as err:
        probe.step(*_batches(model, 16)[0])
    return {"device_memory": err.value.device_needed}


def _train(model: str, opt: str, n: int, budgets: dict[str, object], forward: int | str = 8,
           dropout: float = 0.0) -> tuple[harmony.Trainer, dict[str, torch.Tensor]]:
    factory, loss_fn, _ = MODELS[model]
    trainer = harmony.Trainer(factory(dropout), loss_fn, optimizer=OPTIMIZERS[opt][0],
                              micro_batch_size=2, forward_micro_batch_size=forward, **budgets)
    with trainer:
        for x, y in _batches(model, n):
            trainer.step(x, y)
        return trainer, trainer.state_dict()


def _grouped_reference(model: str, opt: str, n: int, plan: harmony.Plan,
                       dropout: float = 0.0) -> dict[str, torch.Tensor]:
    factory, loss_fn, _ = MODELS[model]
    forwards = {p: [t.mbs for t in plan.schedule.tasks if t.op is Op.FWD and t.pack == p]
                for p in range(len(plan.bounds) - 1)}
    return grouped_reference_train(factory(dropout), loss_fn, OPTIMIZERS[opt][0],
                                   _batches(model, n), 2, plan.bounds, forwards)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


def _grouped(plan: harmony.Plan) -> set[int]:
    return {t.pack for t in plan.schedule.tasks if len(t.mbs) > 1}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("place", ["half", "nvme", "tightest"])
def test_forward_groups_compute_what_they_should_bit_for_bit(
        model: str, opt: str, place: str, tmp_path: Path) -> None:
    """Micro-batches of 2, forwards over 8, with swapping, NVMe homes and the least device
    memory: harmony's weights equal the grouped computation in plain PyTorch, bit for bit,
    and (SGD) plain PyTorch's accumulation over micro-batches of 2 to rounding."""
    budgets = _budgets(model, opt, place, tmp_path)
    trainer, got = _train(model, opt, 16, budgets)
    plan = trainer.plan
    assert plan is not None and plan.forward_group == 4
    assert _grouped(plan) == set(range(len(plan.bounds) - 1)) != set()
    fwd = [str(t) for t in plan.schedule.tasks if t.op is Op.FWD and t.pack == 0]
    assert fwd == ["F0.0-3", "F0.4-7"]
    if place == "nvme" and opt == "adamw":
        assert Loc.NVME in plan.placement.w
    if place == "tightest":
        assert Loc.HOST in plan.placement.x[1:]  # stashed activations leave the device
    assert trainer.stats.peak_bytes["device"] <= budgets["device_memory"]  # type: ignore[operator]
    _same(got, _grouped_reference(model, opt, 16, plan))
    if opt == "sgd":
        factory, loss_fn, _ = MODELS[model]
        want = reference_train(factory(0.0), loss_fn, OPTIMIZERS[opt][0], _batches(model, 16), 2)
        assert_weights_close(got, want, RTOL)


def test_the_grouped_reference_without_groups_is_plain_pytorch() -> None:
    """The exact reference above is itself plain PyTorch's accumulation when nothing groups
    (the recompute gives what the forward gave), so only the groups tell them apart."""
    factory, loss_fn, _ = MODELS["tuple"]
    opt = OPTIMIZERS["adamw"][0]
    bounds = ((0, 1), (1, 3), (3, 4))
    single = {p: [range(m, m + 1) for m in range(8)] for p in range(2)}
    got = grouped_reference_train(factory(0.3), loss_fn, opt, _batches("tuple", 16), 2, bounds,
                                  single)
    _same(got, reference_train(factory(0.3), loss_fn, opt, _batches("tuple", 16), 2))
    grouped = {p: [range(0, 4), range(4, 8)] for p in range(2)}
    other = grouped_reference_train(factory(0.0), loss_fn, opt, _batches("tuple", 16), 2,
                                    bounds, grouped)
    plain = reference_train(factory(0.0), loss_fn, opt, _batches("tuple", 16), 2)
    assert any(not torch.equal(other[k], plain[k]) for k in plain)


@pytest.mark.parametrize(("n", "forward", "want"), [
    (13, 8, ["F0.0-3", "F0.4-6"]),   # 7 micro-batches (the last of one sample): 4 + 3
    (16, 16, ["F0.0-7"]),            # one forward over the whole batch
    (10, 6, ["F0.0-2", "F0.3-4"]),
])
def test_uneven_groups(n: int, forward: int, want: list[str]) -> None:
    budgets = _budgets("mlp", "sgd", "half", Path())
    trainer, got = _train("mlp", "sgd", n, budgets, forward)
    assert trainer.plan is not None
    assert [str(t) for t in trainer.plan.schedule.tasks if t.op is Op.FWD and t.pack == 0] \
        == want
    _same(got, _grouped_reference("mlp", "sgd", n, trainer.plan))


@pytest.mark.parametrize("model", ["mlp", "tuple"])
def test_packs_with_dropout_run_per_micro_batch(model: str) -> None:
    """The profile marks dropout layers; their packs run a forward per micro-batch (so the
    recompute draws the forward's masks), the other packs group, and the run is the grouped
    computation with every layer's masks from (seed, step, micro-batch, layer)."""
    budgets = _budgets(model, "sgd", "tightest", Path())
    trainer, got = _train(model, "sgd", 16, budgets, dropout=0.3)
    plan = trainer.plan
    assert plan is not None and plan.ungrouped and _grouped(plan)
    for p, layer, why in plan.ungrouped:
        a, b = plan.bounds[p]
        assert a <= layer < b and "draws random numbers" in why
        assert isinstance(trainer.chain.layers[layer], nn.Dropout) or \
            any(isinstance(m, nn.Dropout) for m in trainer.chain.layers[layer].modules())
        assert all(len(t.mbs) == 1 for t in plan.schedule.tasks
                   if t.pack == p and t.op is Op.FWD)
    text = plan.describe(trainer.chain.names)
    assert f"layer {plan.ungrouped[0][1]} " in text and "draws random numbers" in text
    _same(got, _grouped_reference(model, "sgd", 16, plan, dropout=0.3))
    factory, loss_fn, _ = MODELS[model]
    want = reference_train(factory(0.3), loss_fn, OPTIMIZERS["sgd"][0], _batches(model, 16), 2)
    assert_weights_close(got, want, RTOL)


def _batch_norm_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 96), nn.Tanh(), nn.Linear(96, 96), nn.BatchNorm1d(96),
                         nn.ReLU(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 5))


def test_batch_norm_packs_run_per_micro_batch() -> None:
    """BatchNorm (running statistics, batch statistics): its pack runs per micro-batch and
    updates the statistics once per micro-batch; the weights and statistics are the grouped
    computation's, bit for bit. Against plain PyTorch the tolerance is wider than for the
    other models: over a micro-batch of 2 samples BatchNorm divides by their spread, which
    magnifies the rounding differences the grouped packs feed it (seen: 7e-5 relative)."""
    batches = _batches("mlp", 16)
    budget = training_state_bytes(_batch_norm_model(), 4) // 3
    sgd = OPTIMIZERS["sgd"][0]
    with harmony.Trainer(_batch_norm_model(), nn.functional.cross_entropy, optimizer=sgd,
                         micro_batch_size=2, forward_micro_batch_size=8,
                         device_memory=budget) as t:
        for x, y in batches:
            t.step(x, y)
        plan = t.plan
        got = t.state_dict()
    assert plan is not None and _grouped(plan)
    assert [(i, why) for _, i, why in plan.ungrouped] == [
        (3, "changes its buffers in its forward (running statistics)")]
    forwards = {p: [t.mbs for t in plan.schedule.tasks if t.op is Op.FWD and t.pack == p]
                for p in range(len(plan.bounds) - 1)}
    _same(got, grouped_reference_train(_batch_norm_model(), nn.functional.cross_entropy, sgd,
                                       batches, 2, plan.bounds, forwards))
    want = reference_train(_batch_norm_model(), nn.functional.cross_entropy, sgd, batches, 2)
    assert torch.equal(got["3.num_batches_tracked"], want["3.num_batches_tracked"])
    assert_weights_close(got, want, 1e-3)


def test_accounted_device_peak_is_the_predicted_one() -> None:
    """The runtime charges a group's working memory and outputs as the simulator does."""
    budgets = _budgets("transformer", "adamw", "half", Path())
    trainer, _ = _train("transformer", "adamw", 16, budgets)
    plan = trainer.plan
    assert plan is not None and _grouped(plan)
    predicted, accounted = plan.predicted.peak[Loc.DEVICE], trainer.stats.peak_bytes["device"]
    assert abs(accounted - predicted) <= 0.05 * predicted, (accounted, predicted)
    # and the groups are what made the peak: a forward per micro-batch needs less
    single, _ = _train("transformer", "adamw", 16, budgets, forward=2)
    assert single.stats.peak_bytes["device"] < accounted


def test_auto_chooses_within_the_budget_and_computes_what_it_chose() -> None:
    budgets = _budgets("transformer", "sgd", "half", Path())
    trainer, got = _train("transformer", "sgd", 16, budgets, forward="auto")
    plan = trainer.plan
    assert plan is not None and plan.forward_group in (1, 2, 4, 8)
    assert trainer.stats.peak_bytes["device"] <= budgets["device_memory"]  # type: ignore[operator]
    _same(got, _grouped_reference("transformer", "sgd", 16, plan))


def test_default_is_a_forward_per_micro_batch() -> None:
    factory, loss_fn, data = MODELS["mlp"]
    with harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2,
                         device_memory=training_state_bytes(factory(0.0), 8) // 2) as t:
        t.step(*data(16, torch.Generator().manual_seed(0)))
        assert t.plan is not None and t.plan.forward_group == 1
        assert all(len(task.mbs) <= 1 for task in t.plan.schedule.tasks)


def test_auto_micro_batch_size_with_auto_forward_groups() -> None:
    """Both sizes chosen: the micro-batch size from the budgets, then the forward groups; the
    run is what the chosen plan computes."""
    factory, loss_fn, _ = MODELS["mlp"]
    budget = training_state_bytes(factory(0.0), 4) // 2
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=OPTIMIZERS["sgd"][0],
                         micro_batch_size="auto", forward_micro_batch_size="auto",
                         device_memory=budget) as t:
        for x, y in _batches("mlp", 16):
            t.step(x, y)
        plan, got, mbs = t.plan, t.state_dict(), t.micro_batch_size_used
    assert plan is not None and mbs is not None
    assert t.stats.peak_bytes["device"] <= budget
    forwards = {p: [task.mbs for task in plan.schedule.tasks
                    if task.op is Op.FWD and task.pack == p] for p in range(len(plan.bounds) - 1)}
    want = grouped_reference_train(factory(0.0), loss_fn, OPTIMIZERS["sgd"][0],
                                   _batches("mlp", 16), mbs, plan.bounds, forwards)
    _same(got, want)
