"""Tiers: byte accounting against a capacity, pooled buffers, releases after pending copies."""

from __future__ import annotations

import random

import pytest
import torch

from swap.tier import OutOfCapacity, Tier, fmt_bytes

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Pending:
    """A copy that is not done until someone synchronizes on it (or ``finish`` is called).

    ``syncs`` counts the synchronize calls that would have blocked (made before it was done).
    """

    def __init__(self) -> None:
        self.finished = False
        self.syncs = 0

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.synchronize()

    def synchronize(self) -> None:
        self.syncs += not self.finished
        self.finished = True

    def finish(self) -> None:
        self.finished = True


# -- accounting ----------------------------------------------------------------------------------

def test_doc_example() -> None:
    t = Tier("device", CPU, capacity=1024)
    buf = t.allocate(512)
    assert t.used == 512
    t.release(buf)
    assert (t.used, t.peak) == (0, 512)


def test_buffers() -> None:
    t = Tier("host", CPU)
    buf = t.allocate(37)
    assert (buf.dtype, buf.shape, buf.device, buf.is_contiguous()) == (torch.uint8, (37,), CPU,
                                                                       True)
    assert t.allocate(0).numel() == 0


def test_used_and_peak() -> None:
    t = Tier("device", CPU, capacity=1000)
    a = t.allocate(300)
    b = t.allocate(200)
    t.charge(100)
    assert (t.used, t.peak) == (600, 600)
    t.release(a)
    t.uncharge(100)
    assert (t.used, t.peak) == (200, 600)
    t.reset_peak()
    assert t.peak == 200
    t.charge(50)
    t.release(b)
    assert (t.used, t.peak) == (50, 250)


def test_capacity_error_names_tier_and_sizes() -> None:
    t = Tier("host", CPU, capacity=1536)
    t.charge(1024, "optimizer state of pack 0")
    with pytest.raises(OutOfCapacity) as info:
        t.allocate(1024, "W3")
    err = info.value
    assert str(err) == "host tier: W3 needs 1.00KiB but 1.00KiB of its 1.50KiB are in use"
    assert (err.tier, err.nbytes, err.used, err.capacity) == ("host", 1024, 1024, 1536)
    assert isinstance(err, MemoryError)
    assert (t.used, t.peak, t.allocations) == (1024, 1024, 0)  # nothing changed
    with pytest.raises(OutOfCapacity, match="device tier: a tensor needs 2.00MiB but 0B of its "
                       "1.00MiB are in use"):
        Tier("device", CPU, capacity=1 << 20).charge(2 << 20)


def test_exactly_full_is_fine() -> None:
    t = Tier("device", CPU, capacity=100)
    t.allocate(60)
    t.charge(40)
    assert t.used == 100
    with pytest.raises(OutOfCapacity):
        t.charge(1)


def test_negative_capacity() -> None:
    with pytest.raises(ValueError, match="nvme tier capacity must be >= 0 bytes, got -1"):
        Tier("nvme", CPU, capacity=-1)


def test_no_capacity_never_raises() -> None:
    t = Tier("host", CPU)
    t.charge(1 << 50)
    assert t.used == 1 << 50


@pytest.mark.parametrize(("n", "text"), [
    (0, "0B"), (1023, "1023B"), (1024, "1.00KiB"), (1536, "1.50KiB"), (5 << 20, "5.00MiB"),
    (3 << 30, "3.00GiB"), (1 << 40, "1.00TiB"), (1 << 50, "1024.00TiB"), (-2048, "-2.00KiB"),
])
def test_fmt_bytes(n: int, text: str) -> None:
    assert fmt_bytes(n) == text


# -- the pool ------------------------------------------------------------------------------------

def test_pool_reuses_buffers_of_the_same_size() -> None:
    t = Tier("host", CPU, capacity=10_000)
    sizes = [100, 200, 300, 200]
    ptrs = None
    for _ in range(50):
        bufs = [t.allocate(n) for n in sizes]
        assert t.allocations == len(sizes)
        step_ptrs = sorted(b.data_ptr() for b in bufs)
        assert ptrs in (None, step_ptrs)
        ptrs = step_ptrs
        for b in bufs:
            t.release(b)
        assert (t.used, t.cached) == (0, sum(sizes))
    assert t.peak == sum(sizes)


def test_pool_does_not_reuse_other_sizes() -> None:
    t = Tier("host", CPU, capacity=1000)
    t.release(t.allocate(100))
    t.release(t.allocate(101))
    assert (t.allocations, t.cached) == (2, 201)


def test_cache_limit_drops_largest_first() -> None:
    t = Tier("host", CPU, capacity=10_000, cache_limit=300)
    bufs = {n: t.allocate(n) for n in (200, 100, 150)}
    t.release(bufs[200])
    t.release(bufs[100])
    assert t.cached == 300
    t.release(bufs[150])  # the 200-byte buffer goes to make room
    assert t.cached == 250
    assert t.allocations == 3
    t.allocate(100)
    t.allocate(150)
    assert t.allocations == 3  # both reused
    t.allocate(200)
    assert t.allocations == 4  # dropped, so allocated again
    assert t.cached == 0


def test_buffer_larger_than_the_cache_limit_is_not_kept() -> None:
    t = Tier("host", CPU, capacity=1000, cache_limit=50)
    t.release(t.allocate(100))
    assert t.cached == 0
    t.release(t.allocate(50))
    assert t.cached == 50


def test_cache_limit_zero_turns_the_pool_off() -> None:
    t = Tier("host", CPU, capacity=1000, cache_limit=0)
    for _ in range(3):
        t.release(t.allocate(10))
    assert (t.allocations, t.cached, t.used) == (3, 0, 0)


def test_cache_limit_defaults() -> None:
    assert Tier("host", CPU, capacity=123).cache_limit == 123
    assert Tier("host", CPU).cache_limit is None  # no capacity: no limit
    # PyTorch's caching allocator already reuses CUDA blocks (no CUDA needed to build the tier).
    assert Tier("device", torch.device("cuda"), capacity=123).cache_limit == 0
    assert Tier("device", torch.device("cuda"), capacity=123, cache_limit=7).cache_limit == 7


def test_cached_bytes_are_not_charged() -> None:
    t = Tier("device", CPU, capacity=100)
    t.release(t.allocate(100))
    assert (t.used, t.cached) == (0, 100)
    t.charge(100)  # the capacity counts what is in use, not the pool
    assert t.used == 100


def test_clear_cache() -> None:
    t = Tier("host", CPU, capacity=1000)
    h = Pending()
    t.release(t.allocate(100))
    t.release(t.allocate(200), after=h)
    t.clear_cache()
    assert (h.syncs, t.used, t.cached) == (1, 0, 0)
    t.allocate(100)
    assert t.allocations == 3


# -- releases after pending copies ---------------------------------------------------------------

def test_release_after_keeps_bytes_charged_until_done() -> None:
    t = Tier("host", CPU, capacity=1000)
    h = Pending()
    buf = t.allocate(400)
    t.release(buf, after=h)
    assert (t.used, t.cached) == (400, 0)
    t.allocate(100)  # fits: no reason to wait for the copy
    assert (h.syncs, t.used) == (0, 500)
    h.finish()
    again = t.allocate(400)  # the finished copy's buffer is taken back and reused
    assert (h.syncs, t.used, t.allocations) == (0, 500, 2)
    assert again.data_ptr() == buf.data_ptr()


def test_release_after_a_done_handle_is_immediate() -> None:
    t = Tier("host", CPU, capacity=1000)
    h = Pending()
    h.finish()
    t.release(t.allocate(400), after=h)
    assert (t.used, t.cached) == (0, 400)


def test_uncharge_after() -> None:
    t = Tier("device", CPU, capacity=1000)
    t.charge(600)
    h = Pending()
    t.uncharge(600, after=h)
    assert t.used == 600
    t.charge(400)  # fits without waiting
    assert (h.syncs, t.used) == (0, 1000)
    t.charge(300)  # does not fit: waits for the copy, then the 600 bytes are free
    assert (h.syncs, t.used, t.cached) == (1, 700, 0)


def test_allocation_over_capacity_waits_for_pending_releases() -> None:
    t = Tier("device", CPU, capacity=1000)
    h = Pending()
    t.release(t.allocate(800), after=h)
    buf = t.allocate(500)  # would exceed 1000 unless the 800 bytes come back first
    assert (h.syncs, t.used, t.peak, buf.numel()) == (1, 500, 800, 500)


def test_waits_for_the_oldest_release_only_as_long_as_needed() -> None:
    t = Tier("device", CPU, capacity=1000)
    first, second = Pending(), Pending()
    a, b = t.allocate(300), t.allocate(300)
    t.allocate(300)
    t.release(a, after=first)
    t.release(b, after=second)
    c = t.allocate(300)
    assert (first.syncs, second.syncs, t.used) == (1, 0, 900)
    assert c.data_ptr() == a.data_ptr()
    assert t.allocations == 3


def test_over_capacity_after_waiting_for_everything() -> None:
    t = Tier("device", CPU, capacity=1000)
    handles = [Pending(), Pending()]
    for h in handles:
        t.release(t.allocate(100), after=h)
    t.charge(500)
    with pytest.raises(OutOfCapacity, match="device tier: a buffer needs 600B but 500B"):
        t.allocate(600)
    assert [h.syncs for h in handles] == [1, 1]
    assert t.used == 500


def test_above_the_planned_level_pending_releases_come_back_first() -> None:
    """A planned level below the capacity: a request that would go above it waits for the
    releases pending on copies (oldest first, only as many as needed), so the peak stays at
    the plan's level however slow the copies; with nothing pending it goes above, up to
    the capacity, without raising."""
    t = Tier("host", CPU, capacity=10_000)
    t.plan_for(1000)
    first, second = Pending(), Pending()
    a, b = t.allocate(400), t.allocate(400)
    t.release(a, after=first)
    t.release(b, after=second)
    t.allocate(500)  # 1300 > 1000: the first release comes back, the second need not
    assert (first.syncs, second.syncs, t.used, t.peak) == (1, 0, 900, 900)
    t.allocate(3000)  # above the level: the second release comes back too
    assert (second.syncs, t.used, t.peak) == (1, 3500, 3500)
    t.allocate(2000)  # nothing pending: above the level, within the capacity
    assert t.used == 5500
    t.plan_for(None)
    c = Pending()
    t.release(t.allocate(100), after=c)
    t.allocate(100)  # no level: nothing is waited for below the capacity
    assert (c.syncs, t.used) == (0, 5700)


def test_drain() -> None:
    t = Tier("host", CPU, capacity=1000)
    handles = [Pending() for _ in range(3)]
    for h in handles:
        t.release(t.allocate(100), after=h)
    assert t.used == 300
    t.drain()
    assert [h.syncs for h in handles] == [1, 1, 1]
    assert (t.used, t.cached) == (0, 300)


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_the_books(seed: int) -> None:
    """Against a model: used is what is live or pending, never above capacity; cached stays
    within the cache limit; peak is the highest used."""
    rng = random.Random(seed)
    capacity, limit = 2000, 700
    t = Tier("device", CPU, capacity=capacity, cache_limit=limit)
    live: list[torch.Tensor] = []
    charged: list[int] = []
    pending: list[tuple[Pending, int]] = []
    peak = 0
    for _ in range(400):
        op = rng.choice(["alloc", "alloc", "release", "release_after", "charge", "uncharge",
                         "finish"])
        if op == "alloc":
            n = rng.choice([16, 64, 100, 333])
            try:
                live.append(t.allocate(n))
            except OutOfCapacity as err:
                assert err.used + n > capacity
        elif op == "charge":
            n = rng.randint(1, 400)
            try:
                t.charge(n)
                charged.append(n)
            except OutOfCapacity:
                pass
        elif op == "release" and live:
            t.release(live.pop(rng.randrange(len(live))))
        elif op == "release_after" and live:
            h = Pending()
            buf = live.pop(rng.randrange(len(live)))
            t.release(buf, after=h)
            pending.append((h, buf.numel()))
        elif op == "uncharge" and charged:
            t.uncharge(charged.pop())
        elif op == "finish" and pending:
            rng.choice(pending)[0].finish()
        if rng.random() < 0.1:
            t.charge(0)  # takes back what finished copies freed
        in_flight = sum(n for h, n in pending if not h.finished)
        assert sum(b.numel() for b in live) + sum(charged) + in_flight <= t.used
        assert t.used <= sum(b.numel() for b in live) + sum(charged) + sum(n for _, n in pending)
        assert t.used <= capacity
        assert 0 <= t.cached <= limit
        peak = max(peak, t.used)
        assert t.peak == peak
    t.drain()
    assert t.used == sum(b.numel() for b in live) + sum(charged)
    assert len({b.data_ptr() for b in live if b.numel()}) == len(live)  # no buffer handed out twice


class Failed:
    """A copy that failed: once done, synchronize re-raises its error (as FutureHandle does)."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True
        raise OSError("NVMe write failed")

    wait = synchronize


def test_failed_copy_error_surfaces_on_reclaim() -> None:
    t = Tier("host", CPU, capacity=1000)
    h = Failed()
    t.release(t.allocate(100), after=h)
    h.finished = True
    with pytest.raises(OSError, match="NVMe write failed"):
        t.allocate(10)
    t2 = Tier("host", CPU, capacity=150)
    t2.release(t2.allocate(100), after=Failed())
    with pytest.raises(OSError, match="NVMe write failed"):
        t2.allocate(100)  # waits for the oldest release, which fails


def test_failed_copy_is_reclaimed_once() -> None:
    t = Tier("host", CPU, capacity=1000)
    buf = t.allocate(100)
    h = Failed()
    t.release(buf, after=h)
    h.finished = True
    with pytest.raises(OSError):
        t.allocate(10)
    assert (t.used, t.cached) == (0, 100)
    first = t.allocate(100)  # raises the same error again, having put buf back a second time
    second = t.allocate(100)
    assert first.data_ptr() != second.data_ptr()
    assert (t.used, t.cached) == (200, 0)


# -- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.cuda
@cuda
def test_cuda_device_tier_allocates_on_the_gpu() -> None:
    t = Tier("device", torch.device("cuda"), capacity=1 << 20)
    buf = t.allocate(4096)
    assert buf.is_cuda and buf.numel() == 4096
    t.release(buf)
    assert (t.used, t.cached) == (0, 0)  # the caching allocator does the pooling


@pytest.mark.cuda
@cuda
def test_pinned_host_tier() -> None:
    t = Tier("host", CPU, capacity=1 << 20, pin=True)
    buf = t.allocate(4096)
    assert buf.is_pinned()
    t.release(buf)
    assert t.allocate(4096).data_ptr() == buf.data_ptr()


# -- reservations, a full tier and threads ------------------------------------------------------

def test_reservation_hands_out_within_its_bytes_and_gives_back_the_rest() -> None:
    t = Tier("host", CPU, capacity=1000)
    r = t.reserve(600, "an update")
    assert (t.used, t.peak) == (600, 600)
    with pytest.raises(OutOfCapacity):
        t.allocate(500)  # the reserved bytes are the reservation's
    a, b = r.allocate(300), r.allocate(300)
    assert (r.free, t.used) == (0, 600)
    with pytest.raises(OutOfCapacity, match="host reservation.*an update"):
        r.allocate(1)
    r.release(a)
    c = r.allocate(300)  # reused from the pool, within the reservation
    assert c.data_ptr() == a.data_ptr() and t.used == 600
    r.release(b)
    r.close()
    assert t.used == 300  # c is still out: charged until released
    t.release(c)
    assert (t.used, t.peak) == (0, 600)


def test_reservation_adopts_buffers_and_hands_pending_ones_to_the_tier() -> None:
    t = Tier("host", CPU, capacity=1000)
    staged = t.allocate(200)
    r = t.reserve(300)
    r.adopt(staged)
    assert t.used == 500
    r.release(staged)
    assert r.free == 500 and t.used == 500
    buf = r.allocate(500)
    h = Pending()
    r.release(buf, after=h)  # its write is in flight: the tier keeps its bytes until done
    r.close()
    assert t.used == 500
    t.allocate(600)  # waits for the write, then the 500 bytes are free
    assert h.syncs == 1 and t.used == 600


def test_a_full_tier_calls_when_full_once_and_retries() -> None:
    t = Tier("host", CPU, capacity=1000)
    r = t.reserve(800)
    calls: list[int] = []

    def join() -> bool:
        calls.append(t.used)
        r.close()
        return True

    t.when_full = join
    buf = t.allocate(500)  # does not fit beside the reservation: join, then it does
    assert (calls, t.used, buf.numel()) == ([800], 500, 500)
    t.when_full = lambda: False  # nothing to give back: the error, as without a hook
    with pytest.raises(OutOfCapacity):
        t.charge(600)
    assert t.used == 500


def test_threads_allocating_beside_a_reservation_keep_the_books() -> None:
    """One thread lives on a reservation, another on the tier; neither waits for the other
    and the accounted bytes never exceed the capacity."""
    import threading

    t = Tier("host", CPU, capacity=10_000)
    r = t.reserve(3000)
    over: list[int] = []
    errors: list[BaseException] = []

    def on_reservation() -> None:
        try:
            for _ in range(2000):
                bufs = [r.allocate(1000) for _b in range(3)]
                for b in bufs:
                    r.release(b)
                over.extend([t.used] if t.used > 10_000 else [])
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=on_reservation)
    worker.start()
    rng = random.Random(0)
    held: list[torch.Tensor] = []
    for _ in range(4000):
        if held and (rng.random() < 0.5 or t.used + 2000 > 10_000):
            t.release(held.pop(rng.randrange(len(held))))
        else:
            held.append(t.allocate(rng.choice([500, 1000, 2000])))
        over.extend([t.used] if t.used > 10_000 else [])
    worker.join()
    assert not errors and not over
    for b in held:
        t.release(b)
    r.close()
    assert t.used == 0
