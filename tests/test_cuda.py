"""CUDA: the same exactness and budgets on a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch

import harmony
from schedules.task import Loc
from tests.models import MODELS, training_state_bytes

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _reference_cuda(model: str, batches: list, mbs: int) -> dict[str, torch.Tensor]:
    factory, loss_fn, _ = MODELS[model]
    net = factory(0.0).cuda()
    opt = _adamw(list(net.parameters()))
    for x, y in batches:
        x, y = x.cuda(), y.cuda()
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            (loss_fn(net(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_swapping_on_cuda_equals_pytorch_on_cuda(model: str, schedule: str) -> None:
    """Same kernels, same order: bitwise equal to plain PyTorch on the same GPU."""
    factory, loss_fn, data = MODELS[model]
    g = torch.Generator().manual_seed(1)
    batches = [data(7, g) for _ in range(3)]
    budget = training_state_bytes(factory(0.0), 8) // 2
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                         device="cuda", device_memory=budget, schedule=schedule) as t:
        for x, y in batches:
            t.step(x, y)
        assert t.plan is not None and t.plan.placement.w[0] is Loc.HOST
        assert t.stats.peak_bytes["device"] <= budget
        # The allocator's peak stays within the budget plus an allowance for kernels'
        # temporaries and the allocator's rounding (512-byte blocks, 2 MiB segments).
        allowance = 4 << 20
        assert torch.cuda.max_memory_allocated() - base <= budget + allowance
        got = t.state_dict()
    want = _reference_cuda(model, batches, 3)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_host_buffers_are_pinned() -> None:
    factory, loss_fn, data = MODELS["mlp"]
    budget = training_state_bytes(factory(0.0), 8) // 2
    with harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2, device="cuda",
                         device_memory=budget) as t:
        t.step(*data(4, torch.Generator().manual_seed(0)))
        assert t._runtime is not None
        assert all(p.home_w is not None and p.home_w.is_pinned() for p in t._runtime.packs)


@pytest.mark.parametrize("model", list(MODELS))
def test_nvme_homes_on_cuda_equal_host_homes(model: str, tmp_path) -> None:
    """W, K and X in NVMe files reach the GPU through host staging (swap.staging): the same
    weights as with every home on the host, both updating on the CPU; the host budget holds
    the staging buffers too."""
    factory, loss_fn, data = MODELS[model]
    g = torch.Generator().manual_seed(2)
    batches = [data(7, g) for _ in range(3)]
    state = training_state_bytes(factory(0.0), 8)

    def run(**kw: object) -> tuple[dict[str, torch.Tensor], harmony.Trainer]:
        with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=3,
                             device="cuda", device_memory=state // 2, **kw) as t:
            for x, y in batches:
                t.step(x, y)
            return t.state_dict(), t

    want, _ = run(host_memory=None)
    host = state // 3
    got, t = run(host_memory=host, nvme_dir=str(tmp_path))
    assert t.plan is not None and Loc.NVME in t.plan.placement.w
    assert t.stats.bytes_moved["nvme->host"] > 0 and t.stats.bytes_moved["host->device"] > 0
    assert t.stats.peak_bytes["host"] <= host
    for k in want:
        assert torch.equal(got[k], want[k]), k
