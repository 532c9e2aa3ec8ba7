"""The simulator: peak bytes per tier, bytes per link and step time, checked by hand on small
cases and by bounds that follow from its model on every generator and placement."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable

import pytest

from schedules.generators import GENERATORS, harmony, per_microbatch
from schedules.lower import lower
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.simulate import Sizes, Times, link, simulate
from schedules.task import Kind, Loc, Op, Ref

H, D, N = Loc.HOST, Loc.DEVICE, Loc.NVME
LINKS = [link(a, b) for a in Loc for b in Loc if a is not b]

PLACEMENTS: dict[str, Callable[[int], Placement]] = {
    "all-device": lambda packs: Placement.uniform(packs, D),
    "wk-host-x-device": lambda packs: Placement.uniform(packs, H, D),
    "all-host": lambda packs: Placement.uniform(packs, H),
    "wk-nvme-x-host": lambda packs: Placement.uniform(packs, N, H),
}


def zeros(packs: int, mbs: int) -> list[list[int]]:
    return [[0] * mbs for _ in range(packs)]


def random_case(rng: random.Random, packs: int, mbs: int) -> tuple[Sizes, Times]:
    def per_mb(lo: float, hi: float, f: Callable[[float, float], float]) -> list[list[float]]:
        return [[f(lo, hi) for _ in range(mbs)] for _ in range(packs)]

    n = rng.randint
    sizes = Sizes([n(1, 1000) for _ in range(packs)], [n(1, 1000) for _ in range(packs)],
                  [n(1, 3000) for _ in range(packs)], per_mb(1, 500, n), per_mb(1, 500, n),
                  per_mb(1, 500, n), per_mb(0, 2000, n))
    u = rng.uniform
    times = Times(per_mb(0.1, 1, u), per_mb(0.2, 2, u), [u(0.1, 1) for _ in range(packs)],
                  {name: u(50, 5000) for name in LINKS})
    return sizes, times


def compute_time(times: Times, packs: int, mbs: int) -> float:
    return (sum(times.fwd[p][m] for p in range(packs - 1) for m in range(mbs))
            + sum(times.bwd[p][m] for p in range(packs) for m in range(mbs)) + sum(times.upd))


# -- hand-checked ------------------------------------------------------------------------------

def test_link_names() -> None:
    assert link(H, D) == "host->device"
    assert link(D, N) == "device->nvme"


def test_sizes_of() -> None:
    z = Sizes([1, 2], [3, 4], [5, 6], [[7, 8], [9, 10]], [[11, 12], [13, 14]],
              [[15, 16], [17, 18]], zeros(2, 2))
    got = [z.of(Ref(k, 1, 0 if k.per_micro_batch else None)) for k in Kind]
    assert got == [2, 4, 6, 9, 13, 17]
    assert z.of(Ref(Kind.X, 0, 1)) == 8


def test_peak_and_bytes_two_packs_by_hand() -> None:
    s = lower(harmony(2, 1), Placement.uniform(2, H), prefetch=0)
    assert str(s) == ("+W0 +X0.0 F0.0 ~W0 ~X0.0 +W1 B1.0 ~W1 !X1.0 -D1.0 -G1 U1 !G1 "
                      "+W0 +X0.0 +D1.0 B0.0 ~W0 !X0.0 !D1.0 -G0 U0 !G0")
    # W, G, K per pack; X0.0 = 1000, X1.0 = 3000, D1.0 = 7000; working memory 40000 / 50000.
    sizes = Sizes([10, 20], [1, 2], [100, 200], [[1000], [3000]], [[0], [7000]], zeros(2, 1),
                  [[40000], [50000]])
    r = simulate(s, sizes)
    # Device: B1.0 runs with X1.0 + W1 + its work, and makes D1.0 + G1.
    # Host: W + K (330), plus D1.0 and G1 once written behind.
    assert r.peak == {D: 3000 + 20 + 50000 + 7000 + 2, H: 330 + 7000 + 2, N: 0}
    assert r.bytes_moved == {"host->device": 10 + 1000 + 20 + 10 + 1000 + 7000,
                             "device->host": 7000 + 2 + 1}
    assert r.bytes_by_kind == {
        ("host->device", "W"): 40, ("host->device", "X"): 2000, ("host->device", "D"): 7000,
        ("device->host", "D"): 7000, ("device->host", "G"): 3}
    assert [u[D] for u in r.timeline] == [
        10, 1010, 4010, 4000, 3000, 3020, 10022, 10002, 7002, 2, 0, 0, 0,
        10, 1010, 8010, 8011, 8001, 7001, 1, 0, 0, 0]
    assert [u[H] for u in r.timeline] == [330] * 9 + [7330, 7332, 7332, 7330] + [7330] * 6 + [
        330, 331, 331, 330]
    assert r.step_time is None


def test_step_time_one_pack_by_hand() -> None:
    s = lower(harmony(1, 1), Placement.uniform(1, H), prefetch=0)
    assert str(s) == "+W0 +X0.0 B0.0 ~W0 !X0.0 -G0 U0 !G0"
    sizes = Sizes([10], [5], [40], [[20]], [[0]], [[0]], [[0]])
    times = Times([[0.0]], [[2.0]], [3.0], {"host->device": 10.0, "device->host": 1.0})
    # +W0 0..1, +X0.0 1..3 (same link, FIFO), B0.0 3..5, -G0 5..10, U0 waits for G: 10..13.
    assert simulate(s, sizes, times).step_time == pytest.approx(13.0)


def test_nvme_optimizer_state_by_hand() -> None:
    s = lower(harmony(1, 1), Placement.uniform(1, N, H), prefetch=0)
    assert str(s) == "+W0 +X0.0 B0.0 ~W0 !X0.0 -G0 U0 !G0"
    sizes = Sizes([10], [5], [40], [[20]], [[0]], [[0]], [[0]])
    bw = dict.fromkeys(LINKS, 10.0) | {"nvme->host": 1.0}
    r = simulate(s, sizes, Times([[0.0]], [[2.0]], [3.0], bw))
    # +W0 nvme->device 0..1; +X0.0 host->device 0..2; B0.0 2..4 while the update's W0 (0..10)
    # and K0 (10..50) stream nvme->host; -G0 4..4.5; U0 waits for K0: 50..53; then W0 and K0
    # are written back host->nvme 53..54..58.
    assert r.step_time == pytest.approx(58.0)
    assert r.bytes_moved == {"nvme->device": 10, "host->device": 20, "device->host": 5,
                             "nvme->host": 50, "host->nvme": 50}
    assert r.bytes_by_kind[("nvme->host", "K")] == r.bytes_by_kind[("host->nvme", "K")] == 40
    assert r.bytes_by_kind[("nvme->host", "W")] == r.bytes_by_kind[("host->nvme", "W")] == 10
    # Host: the update's W0 and K0 from B0.0 until U0 ends, plus G0 once written behind.
    assert r.peak == {D: 10 + 20 + 5, H: 10 + 40 + 5, N: 10 + 40}
    assert [u[H] for u in r.timeline] == [0, 0, 50, 50, 50, 55, 5, 0]
    assert r.timeline[-1] == {D: 0, H: 0, N: 50}


def test_forward_group_time_and_peak_by_hand() -> None:
    """A forward over two micro-batches takes its own time and holds both inputs, its working
    memory at both micro-batches' samples, the concatenated input and both outputs at once."""
    s = lower(harmony(2, 3, group=2), Placement.uniform(2, D), prefetch=0)
    assert str(s).startswith("+X0.0 +X0.1 F0.0-1 ~X0.0 ~X0.1 +X0.2 F0.2 ~X0.2 B1.0 ")
    sizes = Sizes([10, 20], [1, 2], [0, 0], [[100, 100, 50], [30, 30, 15]], [[0] * 3, [7, 7, 4]],
                  zeros(2, 3), [[1000, 1000, 500], [2000, 2000, 1000]])
    assert sizes.forward_work(0, range(0, 2)) == 1000 + 1000 + 100 + 100
    assert sizes.forward_work(0, range(2, 3)) == 500  # one micro-batch: nothing concatenated
    r = simulate(s, sizes)
    # W0 + W1, X0.0 and X0.1, the group's work (2200), X1.0 and X1.1 made
    assert r.peak[D] == 30 + 200 + 2200 + 60
    assert [u[D] for u in r.timeline][:5] == [130, 230, 290, 190, 90]
    fwd = [[1.0, 1.0, 0.5], [0.0, 0.0, 0.0]]
    bw = {"host->device": 1e12, "device->host": 1e12}
    grouped = Times(fwd, [[2.0] * 3, [3.0] * 3], [0.5, 0.5], bw, {(0, 0, 1): 1.5})
    assert grouped.forward(0, range(0, 2)) == 1.5 and grouped.forward(0, range(2, 3)) == 0.5
    # F0.0-1 1.5 + F0.2 0.5 + B1.* 9 + U1 0.5 + B0.* 6 + U0 0.5
    assert simulate(s, sizes, grouped).step_time == pytest.approx(18.0)
    # a group without a time of its own takes its micro-batches' time
    plain = Times(fwd, grouped.bwd, grouped.upd, bw)
    assert plain.forward(0, range(0, 2)) == 2.0
    assert simulate(s, sizes, plain).step_time == pytest.approx(18.5)


@pytest.mark.parametrize("group", [2, 3])
def test_forward_group_model_bounds(group: int) -> None:
    """Every grouped harmony schedule, every placement: the step is no shorter than its
    compute (each forward group counted once, at its own time) and, with infinite bandwidth,
    exactly that long; it ends with only W and K at home."""
    rng = random.Random(group)
    for where in sorted(PLACEMENTS):
        for packs, mbs in ((2, 3), (3, 4), (4, 5)):
            for prefetch in (0, 1):
                s = lower(harmony(packs, mbs, group=group), PLACEMENTS[where](packs), prefetch)
                sizes, times = random_case(rng, packs, mbs)
                groups = {(t.pack, t.mbs[0], t.mbs[-1]): rng.uniform(0.1, 1)
                          for t in s.tasks if t.op is Op.FWD and len(t.mbs) > 1}
                assert groups
                times = Times(times.fwd, times.bwd, times.upd, times.bandwidth, groups)
                compute = (sum(times.forward(t.pack, t.mbs) for t in s.tasks if t.op is Op.FWD)
                           + sum(map(sum, times.bwd)) + sum(times.upd))
                r = simulate(s, sizes, times)
                assert r.step_time is not None and r.step_time >= compute - 1e-9
                fast = Times(times.fwd, times.bwd, times.upd, dict.fromkeys(LINKS, math.inf),
                             groups)
                assert simulate(s, sizes, fast).step_time == pytest.approx(compute)
                home = {loc: sum(sizes.w[p] + sizes.k[p] for p in range(packs)
                                 if s.placement.w[p] is loc) for loc in Loc}
                assert r.timeline[-1] == home


def test_staging_charges_host_buffers_for_nvme_moves_by_hand() -> None:
    """On a GPU, NVMe <-> device moves pass through host staging: a swap-in's buffer until its
    reader runs, a swap-out's until the next compute task ends."""
    s = lower(harmony(2, 1), Placement.uniform(2, N), prefetch=0)
    assert str(s) == ("+W0 +X0.0 F0.0 ~W0 ~X0.0 +W1 B1.0 ~W1 !X1.0 -D1.0 -G1 U1 !G1 "
                      "+W0 +X0.0 +D1.0 B0.0 ~W0 !X0.0 !D1.0 -G0 U0 !G0")
    sizes = Sizes([10, 20], [1, 2], [100, 200], [[1000], [3000]], [[0], [7000]], zeros(2, 1),
                  [[0], [0]])
    plain, staged = simulate(s, sizes), simulate(s, sizes, staging=True)
    assert staged.peak[D] == plain.peak[D] and staged.peak[N] == plain.peak[N]
    assert staged.bytes_moved == plain.bytes_moved
    # The host bytes in excess are staging buffers in flight: +W0 until F0.0 reads it (X0.0 is
    # the caller's batch, already on the host), +W1 until B1.0; -D1.0 (to NVMe) until the next
    # compute task, U1, ends; +W0 and +D1.0 until B0.0 reads them. G goes to the host: no
    # staging.
    extra = [st[H] - pl[H] for st, pl in zip(staged.timeline, plain.timeline)]
    assert extra == [10, 10, 0, 0, 0, 20, 0, 0, 0, 7000, 7000, 0, 0,
                     10, 10, 7010, 0, 0, 0, 0, 0, 0, 0]
    # With every home on the host nothing is staged.
    h = lower(harmony(2, 1), Placement.uniform(2, H), prefetch=0)
    assert simulate(h, sizes, staging=True).timeline == simulate(h, sizes).timeline


def test_chunked_nvme_update_by_hand() -> None:
    """The update streams four chunks (W, K): two read from the backward on, then chunk i+1
    read before chunk i steps, once chunk i-2 is written and released."""
    s = lower(harmony(1, 1), Placement.uniform(1, N, H), prefetch=0)
    chunks = [(2, 8), (3, 12), (1, 4), (4, 16)]
    sizes = Sizes([10], [5], [40], [[20]], [[0]], [[0]], [[0]], chunks=[chunks])
    bw = dict.fromkeys(LINKS, 10.0) | {"nvme->host": 1.0, "host->nvme": 1.0}
    r = simulate(s, sizes, Times([[0.0]], [[2.0]], [5.0], bw))
    # B0.0 2..4 while chunks 0 (0..10) and 1 (10..25) are read; -G0 4..4.5. U0: chunk 0 steps
    # 10..11 (a fifth of the 5 s: 10 of its 50 bytes) and is written 11..21; chunk 2 is read
    # 25..30 while chunk 1 steps 25..26.5 (written 26.5..41.5); chunk 0's bytes are released
    # and chunk 3 read 30..50; chunk 2 steps 30..30.5 (written 41.5..46.5), chunk 3 50..52
    # (written 52..72).
    assert r.step_time == pytest.approx(72.0)
    assert r.bytes_by_kind[("nvme->host", "K")] == r.bytes_by_kind[("host->nvme", "K")] == 40
    assert r.bytes_by_kind[("nvme->host", "W")] == r.bytes_by_kind[("host->nvme", "W")] == 10
    # Host: chunks 0 and 1 from B0.0 on, G0, then chunk 2, less chunk 0, then chunk 3: at
    # most three chunks (chunks 1..3: 40) and G0 (5), where the whole pack would hold 55.
    assert [u[H] for u in r.timeline] == [0, 0, 25, 25, 25, 30, 5, 0]
    assert r.peak[H] == 45
    one = simulate(s, dataclasses.replace(sizes, chunks=()))
    assert one.peak[H] == 55 and one.bytes_moved == r.bytes_moved


def test_overlapped_updates_by_hand() -> None:
    """overlap_updates: U1 (K on the host) runs on the worker while B0.0 computes; G1 stays on
    the host until U0 joins it, and the step ends with U0 on the worker."""
    s = lower(harmony(2, 1), Placement.uniform(2, H, D), prefetch=0)
    assert str(s) == ("+W0 +X0.0 F0.0 ~W0 ~X0.0 +W1 B1.0 ~W1 !X1.0 -G1 U1 !G1 +W0 +X0.0 B0.0 "
                      "~W0 !X0.0 !D1.0 -G0 U0 !G0")
    z = [[0], [0]]
    sizes = Sizes([10, 10], [5, 5], [20, 20], z, z, z, z)
    times = Times([[1.0], [1.0]], [[2.0], [2.0]], [3.0, 3.0],
                  {"host->device": 10.0, "device->host": 10.0})
    # serial: ... -G1 5..5.5, U1 5.5..8.5, +W0 8.5..9.5, B0.0 9.5..11.5, -G0, U0 12..15
    serial = simulate(s, sizes, times)
    assert serial.step_time == pytest.approx(15.0) and serial.peak[H] == 60 + 5
    # overlapped: U1 5.5..8.5 on the worker while +W0 5.5..6.5 and B0.0 6.5..8.5 run; -G0
    # 8.5..9; U0 joins U1 (at 8.5), runs 9..12 on the worker, and the step ends with it
    r = simulate(s, sizes, times, overlap_updates=True)
    assert r.step_time == pytest.approx(12.0)
    assert [u[H] for u in r.timeline][9:] == [65, 65, 65, 65, 65, 65, 65, 65, 65, 70, 65, 60]
    assert r.peak[H] == 60 + 5 + 5 and r.bytes_moved == serial.bytes_moved


def test_simulate_doc_example() -> None:
    s = lower(harmony(2, 1), Placement.uniform(2, H))
    z = [[0], [0]]
    r = simulate(s, Sizes([4, 4], [4, 4], [8, 8], z, z, z, z))
    assert r.bytes_by_kind[("host->device", "W")] == 8


def test_needs_a_lowered_schedule() -> None:
    with pytest.raises(ValueError, match="simulate needs a lowered schedule"):
        simulate(harmony(2, 1), Sizes([1, 1], [1, 1], [1, 1], *[zeros(2, 1)] * 4))


# -- prefetch and peak -----------------------------------------------------------------------

def weights_and_grads_only(w: list[int], g: list[int], mbs: int) -> Sizes:
    z = zeros(len(w), mbs)
    return Sizes(w, g, [1] * len(w), z, z, z, z)


def test_prefetch_peak_by_hand() -> None:
    sizes = weights_and_grads_only([10, 20, 40], [1, 2, 4], 2)
    peak0 = simulate(lower(harmony(3, 2), Placement.uniform(3, H), 0), sizes).peak[D]
    peak1 = simulate(lower(harmony(3, 2), Placement.uniform(3, H), 1), sizes).peak[D]
    assert peak0 == 40 + 4  # one pack's W and G at a time
    assert peak1 == 20 + 40 + 4  # during B2.*: W2 and G2, and W1 kept for the next run


@pytest.mark.parametrize("packs", [1, 2, 3, 4, 5])
def test_prefetch_1_adds_at_most_one_packs_weights(packs: int) -> None:
    """Harmony, all on the host, nothing but W and G: prefetch 0 holds one pack's W and G;
    prefetch 1 adds at most the next run's W."""
    rng = random.Random(packs)
    for mbs in (1, 3):
        for _ in range(10):
            w = [rng.randint(1, 100) for _ in range(packs)]
            g = [rng.randint(1, 100) for _ in range(packs)]
            sizes = weights_and_grads_only(w, g, mbs)
            peak0 = simulate(lower(harmony(packs, mbs), Placement.uniform(packs, H), 0),
                             sizes).peak[D]
            peak1 = simulate(lower(harmony(packs, mbs), Placement.uniform(packs, H), 1),
                             sizes).peak[D]
            assert peak0 == max(a + b for a, b in zip(w, g))
            assert peak0 <= peak1 <= peak0 + max(w)


# -- every generator and placement -----------------------------------------------------------

@pytest.mark.parametrize("where", sorted(PLACEMENTS))
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_model_bounds(name: str, where: str) -> None:
    rng = random.Random(f"{name}{where}")
    for packs in (1, 2, 3, 4):
        for mbs in (1, 3):
            for prefetch in (0, 1, 2):
                s = lower(GENERATORS[name](packs, mbs), PLACEMENTS[where](packs), prefetch)
                sizes, times = random_case(rng, packs, mbs)
                r = simulate(s, sizes, times)
                assert r.step_time is not None
                compute = compute_time(times, packs, mbs)
                busy = {k: v / times.bandwidth[k] for k, v in r.bytes_moved.items()}
                # Compute runs in order on one thread, each link is a FIFO queue...
                assert r.step_time >= max([compute, *busy.values()]) - 1e-9
                # ...and nothing ever waits on anything but compute and transfers.
                assert r.step_time <= compute + sum(busy.values()) + 1e-9
                # With infinite bandwidth transfers take no time.
                fast = Times(times.fwd, times.bwd, times.upd, dict.fromkeys(LINKS, math.inf))
                assert simulate(s, sizes, fast).step_time == pytest.approx(compute)
                # The step ends where it began: W and K at home, nothing else anywhere.
                home = {loc: sum(sizes.w[p] + sizes.k[p] for p in range(packs)
                                 if s.placement.w[p] is loc) for loc in Loc}
                assert r.timeline[-1] == home
                assert len(r.timeline) == len(s.tasks)
                # Working memory is charged only while its task runs: the device may peak
                # inside a task; the host too, by one pack's master W and K, when a deferred
                # update reads them from NVMe; NVMe only between tasks.
                high = {loc: max([home[loc]] + [u[loc] for u in r.timeline]) for loc in Loc}
                assert high[D] <= r.peak[D] <= high[D] + max(max(w) for w in sizes.work)
                staging = max(sizes.w[p] + sizes.k[p] for p in range(packs))
                assert high[H] <= r.peak[H] <= high[H] + staging
                assert r.peak[N] == high[N]
                # Weight traffic is what weight_loads() counts.
                w_home = s.placement.w[0]
                w_bytes = sum(n * sizes.w[p] for p, n in s.weight_loads().items())
                assert r.bytes_by_kind.get((link(w_home, D), "W"), 0) == (
                    0 if w_home is D else w_bytes)
                assert sum(r.bytes_moved.values()) == sum(r.bytes_by_kind.values())


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_gradient_traffic(mbs: int, prefetch: int) -> None:
    """Harmony writes each G out once; per-microbatch (prefetch 0) writes it out per
    micro-batch and reads it back for every accumulation but the first."""
    packs = 3
    g = [3, 5, 7]
    sizes = Sizes([1] * packs, g, [1] * packs, *[zeros(packs, mbs)] * 4)
    r = simulate(lower(harmony(packs, mbs), Placement.uniform(packs, H), prefetch), sizes)
    assert r.bytes_by_kind[("device->host", "G")] == sum(g)
    assert ("host->device", "G") not in r.bytes_by_kind
    if prefetch == 0:
        r = simulate(lower(per_microbatch(packs, mbs), Placement.uniform(packs, H), 0), sizes)
        assert r.bytes_by_kind[("device->host", "G")] == mbs * sum(g)
        assert r.bytes_by_kind.get(("host->device", "G"), 0) == (mbs - 1) * sum(g)


def test_everything_on_the_device_moves_only_the_input() -> None:
    packs, mbs = 3, 2
    rng = random.Random(0)
    sizes, _ = random_case(rng, packs, mbs)
    s: Schedule = lower(harmony(packs, mbs), Placement.uniform(packs, D), 1)
    r = simulate(s, sizes)
    assert r.bytes_moved == {"host->device": 2 * sum(sizes.x[0])}
    assert r.peak[H] == 0 and r.peak[N] == 0


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
@pytest.mark.parametrize("home", [Loc.DEVICE, Loc.HOST])
def test_tied_gradient_held_from_sharer_update_to_owner_update(schedule: str,
                                                                home: Loc) -> None:
    """A sharer's gradient of a tied weight is charged where its update runs from that update
    until the owner's; when the owner updates first nothing is held."""
    packs, mbs, n = 3, 2, 1000
    sizes = Sizes([100] * packs, [50] * packs, [100] * packs, zeros(packs, mbs),
                  zeros(packs, mbs), zeros(packs, mbs), zeros(packs, mbs))
    tied = Sizes(*(getattr(sizes, f) for f in ("w", "g", "k", "x", "d", "s", "work")),
                 held=((2, 0, n),))
    s = lower(GENERATORS[schedule](packs, mbs), Placement.uniform(packs, home), 1)
    plain, held = simulate(s, sizes).timeline, simulate(s, tied).timeline
    upd = [i for i, t in enumerate(s.tasks) if str(t) in ("U0", "U2")]
    first, last = upd
    owner_first = str(s.tasks[first]) == "U0"
    for i, (a, b) in enumerate(zip(plain, held)):
        extra = 0 if owner_first or not first <= i < last else n
        assert b[home] - a[home] == extra, (i, s.tasks[i])
