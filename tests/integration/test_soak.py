"""Soak: 300 steps with weights, optimizer state and activations in NVMe files leak nothing.

One run (a module fixture) trains a small MLP with dropout under the tightest device and host
budgets, so every pack's W, K and stashed X live in the NVMe store, and samples after every step
the process's RSS, its open file descriptors, the files in the store's directory, the store's
keys and bytes, and the device and host tiers' ``allocations`` counters (buffers created rather
than reused). After a warm-up of 20 steps these must stay flat.
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

import harmony
from schedules.task import Loc
from tests.models import MODELS

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"),
                                reason="counts open files in /proc/self/fd (Linux)")

STEPS = 300
WARMUP = 20
MIB = 1 << 20


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1)


@dataclass
class Sample:
    rss: int
    fds: int
    nvme_files: int
    keys: int
    disk_bytes: int
    device_allocations: int
    host_allocations: int
    loss: float


@dataclass
class Soak:
    samples: list[Sample]  # after each step
    objects: tuple[int, int]  # live Python objects (after gc.collect) after warm-up, at the end
    placement: dict[str, list[str]]
    seconds: float


def _least_budgets(nvme: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    """The least device memory any plan needs, then the least host memory at that device
    budget: everything the planner can put on NVMe goes there."""
    factory, loss_fn, _ = MODELS["mlp"]

    def least(device: int, host: int | None) -> harmony.InfeasiblePlan:
        probe = harmony.Trainer(factory(0.1), loss_fn, optimizer=_adamw, micro_batch_size=3,
                                device_memory=1 << 30, host_memory=host, nvme_dir=str(nvme))
        probe.device_memory = device  # past the construction-time check of single layers
        with probe, pytest.raises(harmony.InfeasiblePlan) as err:
            probe.step(*batch)
        return err.value

    device = least(1, None).device_needed
    return device, least(device, 1).host_needed


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _objects() -> int:
    gc.collect()
    return len(gc.get_objects())


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Soak:
    nvme = tmp_path_factory.mktemp("soak-nvme")
    factory, loss_fn, data = MODELS["mlp"]
    g = torch.Generator().manual_seed(3)
    batches = [data(7, g) for _ in range(16)]
    device, host = _least_budgets(nvme, batches[0])
    proc = psutil.Process()
    samples: list[Sample] = []
    objects = 0
    t0 = time.perf_counter()
    with harmony.Trainer(factory(0.1), loss_fn, optimizer=_adamw, micro_batch_size=3,
                         device_memory=device, host_memory=host, nvme_dir=str(nvme)) as t:
        assert t.store is not None
        for step in range(STEPS):
            loss = t.step(*batches[step % len(batches)])
            samples.append(Sample(
                rss=proc.memory_info().rss, fds=_fds(),
                nvme_files=len(os.listdir(t.store.directory)), keys=len(t.store),
                disk_bytes=t.store.used_bytes,
                device_allocations=t.tiers[Loc.DEVICE].allocations,
                host_allocations=t.tiers[Loc.HOST].allocations, loss=loss))
            if step == WARMUP - 1:
                objects = _objects()
        end_objects = _objects()
        assert t.plan is not None
        placement = t.plan.placement.to_json()
    seconds = time.perf_counter() - t0
    assert list(nvme.iterdir()) == []  # close() removed the store's directory
    return Soak(samples, (objects, end_objects), placement, seconds)


def _after_warmup(soak: Soak) -> tuple[Sample, list[Sample]]:
    return soak.samples[WARMUP - 1], soak.samples[WARMUP:]


def test_everything_on_nvme_and_training_sane(soak: Soak) -> None:
    for kind in ("w", "k"):
        assert set(soak.placement[kind]) == {"nvme"}, soak.placement
    # The planner's per-pack refinement may keep the last pack's stashed inputs (read back at
    # once by its backward) on the host where the least host budget leaves room for them, as
    # profiled times decide; every other pack's are on NVMe.
    assert set(soak.placement["x"][:-1]) == {"nvme"}, soak.placement
    assert all(math.isfinite(s.loss) for s in soak.samples)
    assert len(soak.samples) == STEPS


def test_rss_bounded(soak: Soak) -> None:
    base, rest = _after_warmup(soak)
    growth = max(s.rss for s in rest) - base.rss
    late = soak.samples[-1].rss - soak.samples[STEPS // 2].rss
    print(f"\nsoak: {STEPS} steps in {soak.seconds:.1f}s; RSS {base.rss / MIB:.1f}MiB after "
          f"warm-up, +{growth / MIB:.2f}MiB at most after, +{late / MIB:.2f}MiB in the 2nd half")
    assert growth < 50 * MIB
    assert late < 16 * MIB  # a leak of a few buffers per step shows here long before 50 MiB


def test_file_descriptors_constant(soak: Soak) -> None:
    base, rest = _after_warmup(soak)
    assert all(abs(s.fds - base.fds) <= 2 for s in rest), sorted({s.fds for s in rest})


def test_nvme_files_constant(soak: Soak) -> None:
    base, rest = _after_warmup(soak)
    assert {s.nvme_files for s in rest} == {base.nvme_files}
    assert {s.keys for s in rest} == {base.keys}
    assert {s.disk_bytes for s in rest} == {base.disk_bytes}


def test_python_objects_constant(soak: Soak) -> None:
    before, after = soak.objects
    assert after - before < 1000, (before, after)


@pytest.mark.xfail(strict=True, reason=(
    "known limitation: on CPU the device tier's free buffers are host memory, so they share "
    "its budget (used + cached <= capacity) as the host tier's do, and under a device budget "
    "the plan fills a buffer is sometimes allocated anew (~5 per step here) where an unbounded "
    "pool would keep one of every size"))
def test_device_tier_allocations_stop_growing(soak: Soak) -> None:
    base, rest = _after_warmup(soak)
    assert rest[-1].device_allocations == base.device_allocations


@pytest.mark.xfail(strict=True, reason=(
    "known limitation: under a host budget the plan fills, the host tier's free buffers share "
    "the budget (used + cached <= capacity), so when a pack's staging buffer is a little larger "
    "than every cached one and no room is left, the cache is trimmed and a buffer allocated "
    "anew; size classes and best-fit reuse bring this from ~6 to ~2 allocations per step here"))
def test_host_tier_allocations_stop_growing(soak: Soak) -> None:
    base, rest = _after_warmup(soak)
    assert rest[-1].host_allocations == base.host_allocations, (
        f"{(rest[-1].host_allocations - base.host_allocations) / len(rest):.2f} host "
        "allocations per step after warm-up")
