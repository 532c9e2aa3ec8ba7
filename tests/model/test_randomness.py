"""Randomness depends on (seed, step, micro-batch, layer), never on the schedule or placement."""

from __future__ import annotations

import pytest
import torch

import harmony
from tests.models import MODELS, reference_train, training_state_bytes


def ADAMW(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _run(model: str, schedule: str, budget: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    factory, loss_fn, data = MODELS[model]
    g = torch.Generator().manual_seed(3)
    with harmony.Trainer(factory(0.3), loss_fn, optimizer=ADAMW, micro_batch_size=2,
                         device_memory=budget, schedule=schedule, seed=seed) as trainer:
        for _ in range(3):
            trainer.step(*data(5, g))
        return trainer.state_dict()


@pytest.mark.parametrize("model", list(MODELS))
def test_dropout_same_weights_for_every_schedule_and_placement(model: str) -> None:
    half = training_state_bytes(MODELS[model][0](0.0), 8) // 2
    runs = {(s, b): _run(model, s, b) for s in ("harmony", "per-microbatch", "resident")
            for b in (None, half) if not (s == "resident" and b)}
    first = next(iter(runs.values()))
    for key, sd in runs.items():
        for k in first:
            assert torch.equal(sd[k], first[k]), (key, k)
    # Gradients are autograd's on the forward that ran: the same as plain PyTorch drawing the
    # same masks layer by layer (so every recompute reproduced its forward's masks).
    factory, loss_fn, data = MODELS[model]
    g = torch.Generator().manual_seed(3)
    want = reference_train(factory(0.3), loss_fn, ADAMW, [data(5, g) for _ in range(3)], 2)
    for k in first:
        assert torch.equal(first[k], want[k]), k


def test_dropout_depends_on_seed() -> None:
    a, b = _run("mlp", "harmony", None, seed=0), _run("mlp", "harmony", None, seed=1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_layer_rng_restores_global_state() -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with harmony.layer_rng(0, 1, 2, 3, torch.device("cpu")):
        x = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with harmony.layer_rng(0, 1, 2, 3, torch.device("cpu")):
        assert torch.equal(torch.rand(4), x)
    with harmony.layer_rng(0, 1, 2, 4, torch.device("cpu")):
        assert not torch.equal(torch.rand(4), x)
