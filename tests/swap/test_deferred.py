"""The deferred copier (CUDA's semantics on CPU) and the buffer-lifetime checks of its ledger:
copies run late and in order per link, ``wait`` gives the host no knowledge, ``synchronize``
does (with what it implies), and a buffer released, reused or written before the host could
know its copies ended raises an error naming the buffer, the copy and the site."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swap.deferred import DeferredCopier, DeferredHandle
from swap.engine import SwapEngine
from swap.handle import DoneHandle, GroupHandle
from swap.ledger import BufferLifetimeError
from swap.stats import Stats
from swap.streams import ThreadCopier, make_copier
from swap.tier import Reservation, Tier

CPU = torch.device("cpu")
H2D, D2H = "host->device", "device->host"
HERE = "tests/swap/test_deferred.py"


def noop(_: float) -> None:
    pass


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines built in this test get the deferred copier, whatever the run's copier."""
    monkeypatch.setenv("HARMONY_COPIER", "deferred")


@pytest.fixture
def engine(deferred: None) -> Iterator[SwapEngine]:
    e = SwapEngine(CPU, Stats())
    assert isinstance(e._copier, DeferredCopier)
    yield e
    e.close()


def tiers(engine: SwapEngine) -> tuple[Tier, Tier]:
    """A watched host tier and a watched device tier (standing for a GPU's memory)."""
    host, dev = Tier("host", CPU, 1 << 20), Tier("device", CPU, 1 << 20)
    engine.watch([host, dev], device=dev)
    return host, dev


def line_of(text: str) -> int:
    """The line of this file holding ``text`` (for the release sites errors name)."""
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


# -- selection ---------------------------------------------------------------------------------

def test_make_copier_follows_harmony_copier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARMONY_COPIER", "deferred")
    assert isinstance(make_copier(CPU), DeferredCopier)
    monkeypatch.setenv("HARMONY_COPIER", "default")
    assert isinstance(make_copier(CPU), ThreadCopier)
    monkeypatch.setenv("HARMONY_COPIER", "slow")
    with pytest.raises(ValueError, match=r"HARMONY_COPIER='slow' is not a copier; use one of "
                                         r"default, deferred"):
        make_copier(CPU)


def test_the_engine_has_a_ledger_only_when_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONY_COPIER", raising=False)
    e = SwapEngine(CPU, Stats())
    host = Tier("host", CPU)
    e.watch([host])
    assert e.ledger is None and host.ledger is None  # the production path checks nothing
    e.close()


# -- the copier --------------------------------------------------------------------------------

def test_a_copy_waits_in_its_queue_until_something_is_ordered_after_it() -> None:
    c = DeferredCopier(CPU)
    dst = torch.zeros(4)
    h = c.copy(dst, torch.ones(4), H2D, noop)
    assert not torch.equal(dst, torch.ones(4)) and not h.done()
    h.wait()  # compute after it must see it: it runs now...
    assert torch.equal(dst, torch.ones(4))
    assert not h.done()  # ...but the host knows nothing
    h.synchronize()
    assert h.done()


def test_copies_run_in_issue_order_per_link() -> None:
    c = DeferredCopier(CPU)
    dst = torch.zeros(1)
    handles = [c.copy(dst, torch.full((1,), float(i)), H2D, noop) for i in (1, 2, 3)]
    seen = torch.zeros(1)
    other = c.copy(seen, torch.full((1,), 9.0), D2H, noop)  # another link: not run by waits
    handles[1].wait()  # runs 1 then 2, not 3
    assert float(dst) == 2.0 and float(seen) == 0.0
    handles[2].wait()
    assert float(dst) == 3.0
    other.wait()
    assert float(seen) == 9.0


def test_synchronize_makes_the_earlier_copies_of_its_link_known_and_no_others() -> None:
    c = DeferredCopier(CPU)
    a = c.copy(torch.zeros(1), torch.ones(1), H2D, noop)
    b = c.copy(torch.zeros(1), torch.ones(1), H2D, noop)
    other = c.copy(torch.zeros(1), torch.ones(1), D2H, noop)
    other.wait()
    b.synchronize()
    assert a.done() and b.done() and not other.done()


def test_a_copy_issued_after_compute_waited_implies_what_compute_waited_for() -> None:
    """A copy's stream first waits for the compute stream: once the host knows it ended, it
    knows every copy compute had been made to wait for (not those it had not)."""
    c = DeferredCopier(CPU)
    load = c.copy(torch.zeros(1), torch.ones(1), H2D, noop)
    skipped = c.copy(torch.zeros(1), torch.ones(1), "nvme->device", noop)
    load.wait()  # the backward waits for its weights...
    store = c.copy(torch.zeros(1), torch.ones(1), D2H, noop)  # ...then its gradients go home
    store.synchronize()
    assert load.done() and not skipped.done()


def test_errors_surface_at_synchronize_not_at_wait() -> None:
    c = DeferredCopier(CPU)

    def fail() -> None:
        raise RuntimeError("device-side assert")

    h = c.enqueue(H2D, torch.zeros(1), torch.ones(1), fail, noop)
    h.wait()  # a stream wait raises nothing
    with pytest.raises(RuntimeError, match="device-side assert"):
        h.synchronize()


def test_a_device_synchronization_raises_an_error_nothing_raised_once() -> None:
    c = DeferredCopier(CPU)

    def fail() -> None:
        raise RuntimeError("illegal memory access")

    c.enqueue(H2D, torch.zeros(1), torch.ones(1), fail, noop).wait()
    late = c.copy(torch.zeros(1), torch.ones(1), D2H, noop)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        c.synchronize()
    assert late.done()
    c.synchronize()  # (reported once)


def test_a_copy_releases_its_tensors_once_it_ran() -> None:
    c = DeferredCopier(CPU)
    src = torch.ones(3)
    h = c.copy(torch.zeros(3), src, H2D, noop)
    assert h.copy.src is src  # held until it ran, as a stream holds its arguments
    h.wait()
    assert h.copy.src is not src


def test_copies_are_timed() -> None:
    c = DeferredCopier(CPU)
    seconds: list[float] = []
    c.copy(torch.zeros(3), torch.ones(3), H2D, seconds.append).synchronize()
    assert len(seconds) == 1 and seconds[0] >= 0


def test_threads_share_the_copier_without_deadlock(engine: SwapEngine) -> None:
    """A follow-up thread that synchronizes a copy runs it itself, while other threads issue
    and wait on the same links."""
    done = threading.Event()
    staged = torch.zeros(256)
    dst = torch.zeros(256)
    first = engine.copy(staged, torch.ones(256), H2D, "W")
    chained = engine.after(first, lambda: engine.copy(dst, staged, D2H, "W"), "nvme->host")

    def hammer(i: int) -> None:
        for _ in range(50):
            engine.wait(engine.copy(torch.zeros(8), torch.full((8,), float(i)), H2D, "X"), H2D)
        done.set()

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(hammer, range(3)))
    chained.synchronize()
    assert done.is_set() and torch.equal(dst, torch.ones(256))
    assert first.done() and chained.done()
    engine.synchronize_all()


def test_waiting_for_another_devices_handle_raises() -> None:
    other = DeferredCopier(torch.device("cuda", 1))  # (builds no CUDA state)
    h = other.copy(torch.zeros(1), torch.ones(1), H2D, noop)
    e = SwapEngine(CPU, Stats())
    with pytest.raises(ValueError, match=r"a handle of cuda:1 waited for on host->device by the "
                                         r"engine of cpu"):
        e.wait(h, H2D)
    e.wait(DoneHandle(), H2D)  # host work (device None) is anyone's
    e.close()


def test_handles_carry_their_device(engine: SwapEngine) -> None:
    h = engine.copy(torch.zeros(1), torch.ones(1), H2D, "W")
    assert h.device == CPU
    assert GroupHandle([DoneHandle(), h]).device == CPU
    assert engine.after(DoneHandle(), DoneHandle, "a").device == CPU
    assert DoneHandle().device is None


# -- the checks --------------------------------------------------------------------------------

def test_releasing_a_host_buffer_before_the_host_knows_its_copy_ended_raises(
        engine: SwapEngine) -> None:
    host, dev = tiers(engine)
    buf = host.allocate(64, "weights of pack 3")
    h = engine.copy(dev.allocate(64, "W3"), buf, H2D, "W")
    engine.wait(h, H2D)  # compute waited: not enough for the host
    with pytest.raises(BufferLifetimeError) as err:
        host.release(buf)  # the release site
    msg = str(err.value)
    assert "host tier buffer 'weights of pack 3'" in msg
    assert re.search(r"copy #1 on host->device \(issued at tests/swap/test_deferred.py:\d+", msg)
    assert f"released at {HERE}:{line_of('host.release(buf)  # the release site')}" in msg
    assert "reads it and the host does not know it finished" in msg


@pytest.mark.parametrize("cover", ["itself", "later-on-link", "group", "synchronized",
                                   "chained-first"])
def test_a_covered_release_passes(engine: SwapEngine, cover: str) -> None:
    host, dev = tiers(engine)
    buf = host.allocate(64, "staging")
    h = engine.copy(dev.allocate(64, "X"), buf, H2D, "X")
    after = {"itself": lambda: h,
             "later-on-link": lambda: engine.copy(torch.zeros(1), torch.ones(1), H2D, "X"),
             "group": lambda: GroupHandle([DoneHandle(), h]),
             "synchronized": lambda: h.synchronize(),
             "chained-first": lambda: engine.after(h, DoneHandle, "nvme->host")}[cover]()
    host.release(buf, after=after)
    assert host.used == (64 if after is not None and not after.done() else 0)
    engine.synchronize_all()
    assert host.allocate(64, "again") is not None and host.used == 64


def test_a_release_covered_by_another_links_copy_raises(engine: SwapEngine) -> None:
    host, dev = tiers(engine)
    buf = host.allocate(64, "home of X1.0")
    engine.copy(dev.allocate(64, "X1.0"), buf, H2D, "X")
    unrelated = engine.copy(torch.zeros(1), torch.ones(1), D2H, "G")
    with pytest.raises(BufferLifetimeError, match="home of X1.0"):
        host.release(buf, after=unrelated)


def test_device_memory_is_settled_once_compute_waited(engine: SwapEngine) -> None:
    """Only device work touches device memory, and it runs after what compute waited for."""
    host, dev = tiers(engine)
    buf = dev.allocate(64, "weights of pack 0")
    h = engine.copy(buf, host.allocate(64, "home"), H2D, "W")
    with pytest.raises(BufferLifetimeError, match=r"device tier buffer 'weights of pack 0'.*"
                                                  r"no device work is ordered after it"):
        dev.release(buf)
    engine.wait(h, H2D)
    dev.release(buf)


def test_a_copy_touching_a_pooled_buffer_raises(engine: SwapEngine) -> None:
    host, _ = tiers(engine)
    buf = host.allocate(64, "gradients of pack 1")
    host.release(buf)
    with pytest.raises(BufferLifetimeError, match=r"copy #1 on device->host .* writes host tier "
                                                  r"buffer 'gradients of pack 1', which was given "
                                                  r"back to its pool at "
                                                  r"tests/swap/test_deferred.py"):
        engine.copy(buf[:16], torch.ones(16, dtype=torch.uint8), D2H, "G")


def test_a_copy_issued_after_a_pending_release_raises_when_the_buffer_returns(
        engine: SwapEngine) -> None:
    host, dev = tiers(engine)
    buf = host.allocate(64, "home of X0.1")
    h = engine.copy(dev.allocate(64, "X0.1"), buf, H2D, "X")
    host.release(buf, after=h)  # pending
    h.synchronize()  # (the pool takes it back at its next request)
    engine.copy(buf, torch.zeros(64, dtype=torch.uint8), "nvme->host", "X")  # use after release
    with pytest.raises(BufferLifetimeError, match=r"goes back to the pool .* copy #1 on "
                                                  r"nvme->host .* issued after the release"):
        host.allocate(64, "next")


def test_a_host_write_before_the_host_knows_raises(engine: SwapEngine) -> None:
    host, dev = tiers(engine)
    w = host.allocate(64, "weights of pack 2")
    h = engine.copy(dev.allocate(64, "W2"), w, H2D, "W")
    engine.wait(h, H2D)
    with pytest.raises(BufferLifetimeError, match=r"the host writes master weights \(host tier "
                                                  r"buffer 'weights of pack 2'\) at tests/"):
        engine.host_write(w[8:16], "master weights")
    engine.host_write(w[:0], "nothing")
    engine.host_read(w, "a file written from it")  # (the copy only reads it)
    h.synchronize()
    engine.host_write(w[8:16], "master weights")


def test_byte_ranges_of_views_count(engine: SwapEngine) -> None:
    host, _ = tiers(engine)
    w = host.allocate(64, "flat weights")
    engine.copy(w[32:48].view(torch.float32), torch.ones(4), D2H, "W")
    engine.host_write(w[:32], "the first half")  # another range: fine
    with pytest.raises(BufferLifetimeError, match="writes those bytes"):
        engine.host_read(w[40:41], "one byte")


def test_reservations_check_their_releases(engine: SwapEngine) -> None:
    host, dev = tiers(engine)
    r: Reservation = host.reserve(128)
    buf = r.allocate(64, "chunk 0")
    engine.wait(engine.copy(dev.allocate(64, "W"), buf, H2D, "W"), H2D)
    with pytest.raises(BufferLifetimeError, match="chunk 0"):
        r.release(buf)


def test_poisoning_makes_a_stale_read_wrong(engine: SwapEngine) -> None:
    host, _ = tiers(engine)
    buf = host.allocate(16, "activations")
    assert torch.isnan(buf.view(torch.float32)).all()  # new buffers are poisoned
    buf.view(torch.float32).fill_(1.5)
    stale = buf.view(torch.float32)
    host.release(buf)
    assert torch.isnan(stale).all()  # whoever kept a view reads NaN, not 1.5
    again = host.allocate(16, "reused")
    assert again.data_ptr() == buf.data_ptr() and (again == 0xFF).all()


def test_a_buffer_dropped_from_the_pool_is_forgotten(engine: SwapEngine) -> None:
    host, _ = tiers(engine)
    buf = host.allocate(64, "x")
    host.release(buf)
    host.clear_cache()
    assert engine.ledger is not None and not engine.ledger._free


def test_deferred_handles_are_deferred(engine: SwapEngine) -> None:
    assert isinstance(engine.copy(torch.zeros(1), torch.ones(1), H2D, "W"), DeferredHandle)


def test_copies_of_two_links_racing_on_the_same_bytes_raise(engine: SwapEngine) -> None:
    host, dev = tiers(engine)
    staging = host.allocate(64, "staging")
    filled = engine.copy(staging, dev.allocate(64, "G0"), D2H, "G")
    with pytest.raises(BufferLifetimeError, match=r"copy #1 on host->device .* reads bytes that "
                                                  r"copy #1 on device->host .* writes, and "
                                                  r"nothing orders that copy before it"):
        engine.copy(dev.allocate(64, "G0 again"), staging, H2D, "G")
    engine.wait(filled, D2H)  # compute waited: a copy issued now runs after it
    engine.copy(dev.allocate(64, "G0 again"), staging, H2D, "G")
    engine.copy(torch.zeros(64, dtype=torch.uint8), staging, D2H, "G")  # (two reads: fine)


def test_thread_copier_handles_carry_their_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONY_COPIER", raising=False)
    e = SwapEngine(CPU, Stats())
    h = e.copy(torch.zeros(1), torch.ones(1), H2D, "W")
    assert h.device == CPU
    e.wait(h, H2D)
    e.close()
