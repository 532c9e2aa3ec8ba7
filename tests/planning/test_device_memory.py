"""The arithmetic of CUDA device budgets, on CPU: the caching allocator's rounding, the working
memory a CUDA profile measures as the planner charges it, the reserved-bytes window a trainer
reports and the refusal of a budget the GPU cannot hold."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harmony.planning import device_memory as dm
from harmony.planning.planner import pack_sizes
from harmony.planning.profile import LayerProfile, peak_allocated

MIB = 1 << 20


def test_block_and_segment_sizes_follow_the_caching_allocator() -> None:
    assert [dm.block_bytes(n) for n in (0, 1, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]
    assert dm.segment_bytes(1 * MIB) == 2 * MIB  # small pool
    assert dm.segment_bytes(MIB + 1) == 20 * MIB  # medium requests share 20 MiB segments
    assert dm.segment_bytes(10 * MIB) == 10 * MIB  # large: own segment, 2 MiB multiples
    assert dm.segment_bytes(11 * MIB + 1) == 12 * MIB
    with pytest.raises(ValueError, match="nbytes=-1"):
        dm.block_bytes(-1)


def test_reserved_allowance_counts_rounding_and_one_segment_per_pool() -> None:
    assert dm.reserved_allowance([]) == 0
    assert dm.reserved_allowance([1000]) == 24 + 2 * MIB
    assert dm.reserved_allowance([1000, 3000]) == 24 + 72 + 2 * MIB  # still one small segment
    assert dm.reserved_allowance([5 * MIB]) == 20 * MIB
    assert dm.reserved_allowance([11 * MIB + 1]) == 12 * MIB - (11 * MIB + 1)


def test_a_budget_the_gpu_cannot_hold_is_refused_with_the_numbers() -> None:
    dm.check_fits(1 << 30, (1 << 30) + dm.WORKSPACE_HEADROOM)
    with pytest.raises(ValueError, match=r"device_memory=1.00GiB does not fit on cuda:1: "
                                         r"1.00GiB are free .* use device_memory<=960.00MiB"):
        dm.check_fits(1 << 30, 1 << 30, "cuda:1")


class FakeAllocator:
    """torch.cuda's memory statistics over numbers the test sets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reserved = self.peak_reserved = 0
        self.allocated = self.peak_allocated = 0
        self.calls: list[str] = []
        for name, fn in [("synchronize", lambda d=None: self.calls.append("synchronize")),
                         ("empty_cache", self.empty_cache),
                         ("reset_peak_memory_stats", self.reset),
                         ("memory_reserved", lambda d=None: self.reserved),
                         ("max_memory_reserved", lambda d=None: self.peak_reserved),
                         ("memory_allocated", lambda d=None: self.allocated),
                         ("max_memory_allocated", lambda d=None: self.peak_allocated)]:
            monkeypatch.setattr(torch.cuda, name, fn)

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")
        self.reserved = 96 * MIB  # what live tensors still hold

    def reset(self, device: Any = None) -> None:
        self.calls.append("reset")
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated

    def grow(self, reserved: int = 0, allocated: int = 0) -> None:
        self.reserved += reserved
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.allocated += allocated
        self.peak_allocated = max(self.peak_allocated, self.allocated)


def test_the_reserved_window_counts_from_after_the_cache_is_emptied(
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = FakeAllocator(monkeypatch)
    a.reserved = a.peak_reserved = 400 * MIB  # the profile's and the probe's blocks, cached
    window = dm.ReservedPeak(torch.device("cuda", 0))
    assert window.peak == 0
    window.start()
    assert a.calls == ["synchronize", "empty_cache", "reset"] and window.base == 96 * MIB
    a.grow(reserved=30 * MIB)
    a.grow(reserved=-20 * MIB)
    assert window.peak == 30 * MIB
    cpu = dm.ReservedPeak(torch.device("cpu"))
    cpu.start()
    assert cpu.peak == 0


def test_peak_allocated_is_measured_above_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    a = FakeAllocator(monkeypatch)
    a.allocated = 50 * MIB

    def layer() -> None:
        a.grow(allocated=7 * MIB)
        a.grow(allocated=-7 * MIB)

    assert peak_allocated(layer, torch.device("cuda", 0)) == 7 * MIB
    assert peak_allocated(layer, torch.device("cpu")) == 0  # not measured on CPU


def _layer(saved: float, out: float, work: float = 0.0) -> LayerProfile:
    return LayerProfile("l", w_bytes=100, g_bytes=100, in_bytes=8.0, in_grad_bytes=8.0,
                        saved_bytes=saved, out_bytes=out, fwd_s=1e-3, bwd_s=2e-3, samples=1,
                        work_bytes=work)


def test_a_packs_working_memory_charges_what_a_cuda_profile_measured() -> None:
    unmeasured = [_layer(40.0, 10.0), _layer(60.0, 10.0)]
    sizes = pack_sizes(unmeasured, ((0, 2),), [4], k_ratio=2.0)
    assert sizes.work == [[(40 + 60 + 2 * 10) * 4]]  # the estimate: saved + 2 outputs
    # A layer whose kernels need scratch beyond what autograd saves (attention, say):
    measured = [_layer(40.0, 10.0, work=40.0 + 15.0), _layer(60.0, 10.0, work=60.0 + 300.0)]
    sizes = pack_sizes(measured, ((0, 2),), [4], k_ratio=2.0)
    assert sizes.work == [[(40 + 60 + 300) * 4]]  # every saved tensor, one layer's scratch
    small = [_layer(40.0, 10.0, work=45.0)]  # measured below the estimate: the estimate holds
    assert pack_sizes(small, ((0, 1),), [4], 2.0).work == [[(40 + 20) * 4]]


def test_room_for_new_packs_counts_free_cached_and_held(monkeypatch: pytest.MonkeyPatch) -> None:
    a = FakeAllocator(monkeypatch)
    a.reserved, a.allocated = 900 * MIB, 700 * MIB  # 200 MiB cached, free for reuse
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1000 * MIB, 80 << 30))
    cuda = torch.device("cuda", 0)
    assert dm.room_for_new_packs(cuda, held=300 * MIB) == (1000 + 200 + 300) * MIB

