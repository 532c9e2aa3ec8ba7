"""Pinned host memory counted at the bytes really pinned (swap/pinned.py), and a host tier that
pins its buffers that way, outside its lock; checked on CPU with the CUDA registration calls
recorded."""

from __future__ import annotations

import threading

import pytest
import torch

import swap.pinned as pinned
from swap.aligned import PAGE, round_up
from swap.pinned import PinnedAllocator
from swap.tier import Tier, size_class

CPU = torch.device("cpu")


class Driver:
    """Stands in for cudaHostRegister/cudaHostUnregister: which ranges are locked now."""

    def __init__(self, fail_above: int | None = None) -> None:
        self.locked: dict[int, int] = {}
        self.calls: list[tuple[str, int, int]] = []
        self.fail_above = fail_above

    def register(self, ptr: int, nbytes: int) -> int:
        self.calls.append(("register", ptr, nbytes))
        if self.fail_above is not None and sum(self.locked.values()) + nbytes > self.fail_above:
            return 2  # cudaErrorMemoryAllocation
        assert ptr % PAGE == 0 and nbytes % PAGE == 0 and ptr not in self.locked
        self.locked[ptr] = nbytes
        return 0

    def unregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr, self.locked.get(ptr, -1)))
        return 0 if self.locked.pop(ptr, None) is not None else 4


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Driver:
    d = Driver()
    monkeypatch.setattr(pinned, "_cuda_register", d.register)
    monkeypatch.setattr(pinned, "_cuda_unregister", d.unregister)
    return d


def test_a_buffer_pins_its_own_pages_and_unpins_when_its_last_view_goes(driver: Driver) -> None:
    alloc = PinnedAllocator()
    buf = alloc(10_000)
    assert buf.numel() == 10_000 and buf.dtype == torch.uint8
    assert buf.data_ptr() % PAGE == 0
    assert driver.locked == {buf.data_ptr(): 3 * PAGE}  # whole pages, not a power of two
    assert alloc.pinned == alloc.peak == 3 * PAGE and alloc.buffers == 1
    view = buf[4096:].view(torch.float32)  # the tier hands out views like this
    view.fill_(1.5)
    del buf
    assert driver.locked and alloc.pinned == 3 * PAGE  # a view still uses the pages
    del view
    assert driver.locked == {} and alloc.pinned == 0 and alloc.buffers == 0
    assert alloc.peak == 3 * PAGE
    assert [c[0] for c in driver.calls] == ["register", "unregister"]


def test_large_buffers_pin_what_they_need() -> None:
    d = Driver()
    alloc = PinnedAllocator(d.register, d.unregister)
    sizes = [65 << 20, (1 << 20) + 1, 4096]  # torch's host allocator would pin 128, 2, 0.004 MiB
    bufs = [alloc(n) for n in sizes]
    assert alloc.pinned == sum(-(-n // PAGE) * PAGE for n in sizes)
    assert alloc.pinned < (67 << 20)
    del bufs
    assert alloc.pinned == 0 and d.locked == {}


def test_a_refused_registration_says_what_to_lower() -> None:
    d = Driver(fail_above=8 * PAGE)
    alloc = PinnedAllocator(d.register, d.unregister)
    keep = alloc(6 * PAGE)
    with pytest.raises(MemoryError, match=r"cudaHostRegister of 16384 bytes failed .*host_memory"):
        alloc(4 * PAGE)
    assert alloc.pinned == 6 * PAGE and alloc.buffers == 1
    del keep
    assert alloc(0).numel() == 0 and alloc.pinned == 0


def test_a_pinned_host_tier_never_asks_torch_for_pinned_memory(
        driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty(pin_memory=True) rounds to a power of two and keeps the block pinned."""
    empty = torch.empty

    def no_caching_pins(*args: object, **kw: object) -> torch.Tensor:
        assert not kw.get("pin_memory"), "the caching host allocator was used"
        return empty(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "empty", no_caching_pins)
    tier = Tier("host", CPU, capacity=8 << 20, pin=True, share_capacity=True)
    a, b = tier.allocate(3 << 20, "W0"), tier.allocate(100_000, "X1.0")
    assert sum(driver.locked.values()) == round_up(size_class(3 << 20), PAGE) + round_up(
        size_class(100_000), PAGE)
    assert tier.pinned == sum(driver.locked.values())
    tier.release(a)
    tier.release(b)
    tier.clear_cache()
    del a, b
    assert driver.locked == {}  # given back to the system, not kept pinned


def test_new_buffers_are_made_outside_the_tier_lock() -> None:
    """Pinning is slow: while one thread makes a buffer, others use the tier."""
    tier: Tier
    seen: list[bool] = []
    started, finish = threading.Event(), threading.Event()

    def slow_alloc(n: int) -> torch.Tensor:
        seen.append(tier._lock.locked())
        if n == 4096 * 3:
            started.set()
            assert finish.wait(10.0)
        return torch.empty(n, dtype=torch.uint8)

    tier = Tier("host", CPU, capacity=1 << 20, alloc=slow_alloc)
    cached = tier.allocate(1000)
    tier.release(cached)
    maker = threading.Thread(target=tier.allocate, args=(4096 * 3,))
    maker.start()
    assert started.wait(10.0)
    reused = tier.allocate(1000)  # served from the pool while the other thread allocates
    assert reused.data_ptr() == cached.data_ptr()
    assert tier.used == 1000 + 4096 * 3  # the pending buffer's bytes are charged already
    finish.set()
    maker.join()
    assert seen == [False, False]


def test_a_failed_new_buffer_gives_its_charge_back() -> None:
    def failing(n: int) -> torch.Tensor:
        raise MemoryError("no pinned memory")

    tier = Tier("host", CPU, capacity=1 << 20, alloc=failing)
    with pytest.raises(MemoryError):
        tier.allocate(4096)
    assert tier.used == 0 and tier.allocations == 0
    r = tier.reserve(4096)
    with pytest.raises(MemoryError):
        r.allocate(4096)
    assert r.free == 4096
