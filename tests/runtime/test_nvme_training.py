"""Training with weights, optimizer state and activations on NVMe files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import harmony
from schedules.task import Loc
from tests.fs import tmpfs
from tests.models import MODELS, reference_train, training_state_bytes
from tests.timing import fix_timing


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _sgd(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def _batches(model: str, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [MODELS[model][2](7, g) for _ in range(n)]


def _trainer(model: str, nvme: Path, host_fraction: float = 0.5, opt=_adamw,
             state_per_param: int = 8) -> harmony.Trainer:
    factory, loss_fn, _ = MODELS[model]
    state = training_state_bytes(factory(0.0), state_per_param)
    return harmony.Trainer(factory(0.0), loss_fn, optimizer=opt, micro_batch_size=3,
                           device_memory=state // 2, host_memory=int(state * host_fraction),
                           nvme_dir=nvme)


@pytest.mark.parametrize("model", ["transformer", "tuple"])
@pytest.mark.parametrize("opt,per_param", [(_adamw, 8), (_sgd, 4)])
def test_weights_and_state_on_nvme_equal_pytorch(tmp_path: Path, model: str, opt, per_param,
                                                 ) -> None:
    batches = _batches(model)
    with _trainer(model, tmp_path, 0.5, opt, per_param) as t:
        for b in batches:
            t.step(*b)
        plan = t.plan
        # the packs that fit stay on the host, the rest live on NVMe
        assert plan is not None and Loc.NVME in plan.placement.w
        assert t.host_memory is not None and t.stats.peak_bytes["host"] <= t.host_memory
        assert t.stats.bytes_moved["host->nvme"] > 0 and t.stats.bytes_moved["nvme->host"] > 0
        got = t.state_dict()
    want = reference_train(MODELS[model][0](0.0), MODELS[model][1], opt, batches, 3)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_activations_on_nvme_equal_pytorch(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The tightest device and host budgets push the stashed activations to NVMe as well."""
    # Which of the plans that fit is fastest must not follow the machine's load: the probes
    # that find the least budgets and the trainer must see the same times.
    fix_timing(monkeypatch.setattr)
    batches = _batches("transformer")
    factory, loss_fn, _ = MODELS["transformer"]
    device, host = _least_budgets(tmp_path, batches[0])
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                         device_memory=device, host_memory=host, nvme_dir=tmp_path) as t:
        for b in batches:
            t.step(*b)
        assert t.plan is not None and Loc.NVME in t.plan.placement.x
        assert t.stats.peak_bytes["host"] <= host
        assert t.stats.kind_bytes("device->nvme", "X") > 0
        got = t.state_dict()
    want = reference_train(factory(0.0), loss_fn, _adamw, batches, 3)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_files_private_and_removed_on_close(tmp_path: Path) -> None:
    with _trainer("transformer", tmp_path) as t:
        t.step(*_batches("transformer")[0])
        assert t.store is not None
        d = t.store.directory
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        files = [f for f in d.iterdir() if f.is_file()]
        assert files
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_resume_with_nvme(tmp_path: Path) -> None:
    batches = _batches("transformer", 4)
    (tmp_path / "a").mkdir()
    with _trainer("transformer", tmp_path / "a") as straight:
        for b in batches:
            straight.step(*b)
        want = straight.state_dict()
    with _trainer("transformer", tmp_path / "a") as first:
        for b in batches[:2]:
            first.step(*b)
        first.save(tmp_path / "ckpt")
    with _trainer("transformer", tmp_path / "a") as resumed:
        resumed.load(tmp_path / "ckpt")
        for b in batches[2:]:
            resumed.step(*b)
        got = resumed.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_bad_nvme_dir_refused_at_construction(tmp_path: Path) -> None:
    factory, loss_fn, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match="does-not-exist"):
        harmony.Trainer(factory(0.0), loss_fn, nvme_dir=str(tmp_path / "does-not-exist"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="file"):
        harmony.Trainer(factory(0.0), loss_fn, nvme_dir=str(blocker))


def _least_budgets(tmp_path: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    """The least device memory any plan needs, then the least host memory at that device
    budget (which pushes the stashed activations to NVMe)."""
    factory, loss_fn, _ = MODELS["transformer"]

    def least(device: int, host: int | None) -> harmony.InfeasiblePlan:
        probe = harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                                device_memory=1 << 30, host_memory=host, nvme_dir=tmp_path)
        probe.device_memory = device  # past the construction-time check of single layers
        with probe, pytest.raises(harmony.InfeasiblePlan) as err:
            probe.step(*batch)
        return err.value

    device = least(1, None).device_needed
    return device, least(device, 1).host_needed


def test_disk_full_mid_step_is_clear_and_checkpoint_survives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NVMe directory fills up while a step writes its activations: a clear error naming
    the problem, and the last saved checkpoint (on another disk) still loads intact."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    fix_timing(monkeypatch.setattr)  # (the same plans whatever the machine's load)
    batches = _batches("transformer", 3)
    device, host = _least_budgets(tmp_path, batches[0])
    factory, loss_fn, _ = MODELS["transformer"]
    with tmpfs(tmp_path / "small", "size=2m") as small:
        t = harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                            device_memory=device, host_memory=host, nvme_dir=small)
        with t:
            t.step(*batches[0])
            assert t.plan is not None and Loc.NVME in t.plan.placement.x
            t.save(tmp_path / "ckpt")
            saved = t.state_dict()
            free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
            (small / "filler").write_bytes(b"\0" * max(free - 8192, 0))
            with pytest.raises(OSError, match="(?i)no space|ENOSPC|full") as err:
                t.step(*batches[1])
            assert "nvme_dir" in str(err.value) or str(small) in str(err.value)
            assert t.step_count == 1
            if t.runtime is not None and t.runtime.updated:
                with pytest.raises(RuntimeError, match="load"):  # no training on mixed weights
                    t.step(*batches[2])
    (tmp_path / "other").mkdir()
    with _trainer("transformer", tmp_path / "other") as fresh:
        fresh.load(tmp_path / "ckpt")
        assert fresh.step_count == 1
        got = fresh.state_dict()
    for k in saved:
        assert torch.equal(got[k], saved[k]), k
