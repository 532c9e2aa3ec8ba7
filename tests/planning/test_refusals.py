"""Requests refused before training with the numbers (harmony/planning/refusals.py): a host budget
that cannot hold what the device does not, an nvme_dir without room for the plan, a model
already in host memory beyond the budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harmony
from harmony.planning import refusals
from tests.models import MODELS, TinyTransformer

LOSS = MODELS["transformer"][1]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return MODELS["transformer"][2](6, torch.Generator().manual_seed(0))


def _no_profiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure a refusal comes before the layers are profiled."""
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled before refusing")

    monkeypatch.setattr("harmony.training.planner.profile_layers", fail)


def test_host_budget_too_small_without_nvme_is_refused_at_construction(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_profiling(monkeypatch)
    with pytest.raises(ValueError, match=r"host_memory=100.00KiB is too small without an "
                       r"nvme_dir: .* take [\d.]+KiB \(W [\d.]+KiB, K [\d.]+KiB\), of which "
                       r"device_memory=200.00KiB holds .* at least [\d.]+KiB .*or an nvme_dir"):
        harmony.Trainer(TinyTransformer(), LOSS, device_memory="200KiB", host_memory="100KiB")


def test_nvme_dir_without_room_for_what_fits_nowhere_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_profiling(monkeypatch)
    monkeypatch.setattr(refusals, "free_bytes", lambda d: 1000)
    with pytest.raises(ValueError, match=rf"nvme_dir='{tmp_path}' has 1000B free, but "
                       r"training needs [\d.]+KiB there: at least the weights and optimizer "
                       rf"state .*df -h {tmp_path}"):
        harmony.Trainer(TinyTransformer(), LOSS, device_memory="200KiB",
                        host_memory="100KiB", nvme_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # (refused before the store was made)


def test_nvme_dir_without_room_for_the_plan_is_refused_before_any_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk holds what fits in neither budget, but not the plan's NVMe peak: refused
    once planned, before a pack is built or a weight changes."""
    monkeypatch.setattr(refusals, "free_bytes", lambda d: 120_000)
    model = TinyTransformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = harmony.Trainer(model, LOSS, micro_batch_size=2, device_memory="200KiB",
                        host_memory="400KiB", nvme_dir=str(tmp_path))
    with t, pytest.raises(ValueError, match=r"has 117.19KiB free, but training needs "
                          r"[\d.]+KiB there: the plan's NVMe peak \(\d+ of \d+ packs"):
        t.step(*_batch())
    assert t.runtime is None  # no pack was built
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_in_memory_beyond_the_budgets_is_sent_to_the_meta_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"the model's weights already take [\d.]+KiB of host "
                       r"memory, more than host_memory=10.00KiB \+ device_memory=142.00KiB "
                       r"allows.*torch.device\('meta'\).*weights=PATH.*init=fn"):
        harmony.Trainer(TinyTransformer(), LOSS, device_memory="142KiB",
                        host_memory="10KiB", nvme_dir=str(tmp_path))
    with torch.device("meta"):  # the same model, built on the meta device, trains
        model = TinyTransformer()
    with harmony.Trainer(model, LOSS, micro_batch_size=2, device_memory="142KiB",
                         host_memory="150KiB", nvme_dir=str(tmp_path)) as t:
        t.step(*_batch())
        assert t.plan is not None and "nvme" in t.plan.placement.to_json()["w"]


def test_budgets_that_fit_are_not_refused(tmp_path: Path) -> None:
    """The checks are lower bounds: the least budgets a plan needs pass them."""
    probe = harmony.Trainer(TinyTransformer(), LOSS, micro_batch_size=2,
                            device_memory="200KiB", host_memory=1, nvme_dir=str(tmp_path))
    with probe, pytest.raises(harmony.InfeasiblePlan) as err:
        probe.step(*_batch())
    host = err.value.host_needed
    with harmony.Trainer(TinyTransformer(), LOSS, micro_batch_size=2, device_memory="200KiB",
                         host_memory=host, nvme_dir=str(tmp_path)) as t:
        t.step(*_batch())
