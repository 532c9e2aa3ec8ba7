"""Layers that change their input in place (``nn.ReLU(inplace=True)`` and the like) train as
plain PyTorch trains them: bit for bit, under every schedule, swapped or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from tests.models import assert_weights_close, reference_train, training_state_bytes


class Halve(nn.Module):
    """Changes its input in place and returns it (not idempotent: twice halves twice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(0.5)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(inplace=True), nn.Linear(48, 48),
                         nn.LeakyReLU(0.1, inplace=True), nn.Linear(48, 48), Halve(),
                         nn.Hardtanh(inplace=True), nn.Linear(48, 48), nn.ELU(inplace=True),
                         nn.Linear(48, 5))


def _opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 16, generator=g), torch.randint(0, 5, (6,), generator=g))
            for _ in range(3)]


@pytest.mark.parametrize(("schedule", "budget"), [
    ("harmony", "none"), ("harmony", "tight"), ("per-microbatch", "tight"),
    ("resident", "none")])
def test_in_place_activations_train_bitwise_like_plain_pytorch(schedule: str,
                                                               budget: str) -> None:
    batches = _batches()
    want = reference_train(_model(), nn.functional.cross_entropy, _opt, batches, 2)
    limit = training_state_bytes(_model(), 8) // 3 if budget == "tight" else None
    with harmony.Trainer(_model(), nn.functional.cross_entropy, optimizer=_opt,
                         micro_batch_size=2, schedule=schedule, device_memory=limit) as t:
        for b in batches:
            t.step(*b)
        got = t.state_dict()
        if budget == "tight":
            assert t.plan is not None and len(t.plan.bounds) > 2
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_in_place_activations_in_forward_groups() -> None:
    batches = _batches()
    want = reference_train(_model(), nn.functional.cross_entropy, _opt, batches, 2)
    with harmony.Trainer(_model(), nn.functional.cross_entropy, optimizer=_opt,
                         micro_batch_size=2, forward_micro_batch_size=6,
                         device_memory=training_state_bytes(_model(), 8) // 3) as t:
        for b in batches:
            t.step(*b)
        got = t.state_dict()
        assert t.plan is not None and t.plan.forward_group == 3
    assert_weights_close(got, want, rtol=1e-5)


def test_the_callers_batch_is_not_changed() -> None:
    """A first layer that changes its input in place changes a copy, not the caller's batch
    (which a per-micro-batch recompute would read again)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Linear(16, 5))
    x, y = _batches()[0]
    kept = x.clone()
    with harmony.Trainer(model, nn.functional.cross_entropy, micro_batch_size=2) as t:
        t.step(x, y)
    assert torch.equal(x, kept)


def test_harmony_report_profiles_in_place_layers_on_the_meta_device(tmp_path: Path) -> None:
    from harmony.tools.cli import main

    source = tmp_path / "inplace_model.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(inplace=True), nn.Linear(48, 5))\n"
        "    return model, nn.functional.cross_entropy, "
        "lambda n: (torch.randn(n, 16), torch.randint(0, 5, (n,)))\n")
    assert main(["report", f"{source}:build", "--batch-size", "8"]) == 0
