"""schedules/data_parallel.py: where the all-reduces go, and what the simulator and planner
predict for N ranks."""

from __future__ import annotations

import pytest

from harmony.planning.planner import plan
from harmony.planning.profile import LayerProfile
from schedules.data_parallel import add_allreduce, lag_updates, ring_bytes, shared_bandwidth
from schedules.generators import generate, harmony, per_microbatch
from schedules.lower import lower
from schedules.placement import Placement
from schedules.simulate import Sizes, Times, simulate
from schedules.task import Kind, Loc, Op, Task
from schedules.validate import validate


def test_lag_updates_written_out() -> None:
    assert str(lag_updates(harmony(3, 2))) == (
        "F0.0 F0.1 F1.0 F1.1 B2.0 B2.1 B1.0 B1.1 U2 B0.0 B0.1 U1 U0")
    # deferred updates (clipping) and micro-batch-major schedules are left as they are
    for s in (harmony(3, 2, deferred_updates=True), per_microbatch(3, 2)):
        assert lag_updates(s).tasks == s.tasks


def test_allreduce_on_the_device_written_out() -> None:
    s = add_allreduce(lower(lag_updates(harmony(3, 1)), Placement.uniform(3, Loc.DEVICE)))
    compute_and_reduce = [str(t) for t in s.tasks if t.op.is_compute or t.op is Op.ALLREDUCE]
    assert " ".join(compute_and_reduce) == "F0.0 F1.0 B2.0 &G2 B1.0 &G1 U2 B0.0 &G0 U1 U0"
    assert Task.parse("&G2") == Task(Op.ALLREDUCE, 2, kind=Kind.G)


CASES = [(name, wk, x, pf) for name in ("harmony", "harmony-clip", "per-microbatch")
         for wk in (Loc.DEVICE, Loc.HOST, Loc.NVME) for x in (Loc.DEVICE, Loc.HOST)
         for pf in (0, 1)]


def _dp(name: str, packs: int, mbs: int, placement: Placement, pf: int):  # type: ignore[no-untyped-def]
    compute = generate(name.removesuffix("-clip"), packs, mbs, name.endswith("-clip"))
    return add_allreduce(lower(lag_updates(compute), placement, pf))


@pytest.mark.parametrize("name,wk,x,pf", CASES)
def test_every_gradient_is_reduced_once_before_it_is_read(name: str, wk: Loc, x: Loc,
                                                          pf: int) -> None:
    packs, mbs = 4, 3
    s = _dp(name, packs, mbs, Placement.uniform(packs, wk, x), pf)
    validate(s)
    tasks = list(s.tasks)
    for p in range(packs):
        at = [i for i, t in enumerate(tasks) if t.op is Op.ALLREDUCE and t.pack == p]
        assert len(at) == 1
        last_b = max(i for i, t in enumerate(tasks) if t.op is Op.BWD and t.pack == p)
        assert at[0] > last_b
        # nothing but data moves between the last backward and the all-reduce
        assert not any(t.op.is_compute for t in tasks[last_b + 1:at[0]])
        # the gradient is written back and updated only after it
        later = [i for i, t in enumerate(tasks) if t.pack == p and (
            t.op is Op.UPD or (t.op is Op.SWAP_OUT and t.kind is Kind.G))]
        assert later and all(i > at[0] for i in later if tasks[i].op is Op.UPD)
        g_out = [i for i in later if tasks[i].op is Op.SWAP_OUT and i > last_b]
        if p > 0 and name == "harmony":
            # overlap: the next pack's backward runs between the all-reduce and what reads G
            first_read = min(g_out + [i for i in later if tasks[i].op is Op.UPD])
            assert any(t.op is Op.BWD and t.pack == p - 1 for t in tasks[at[0]:first_read])


def _sizes(packs: int, mbs: int, g: int) -> Sizes:
    z = [[64] * mbs for _ in range(packs)]
    return Sizes([g] * packs, [g] * packs, [2 * g] * packs, z, z, z, z)


def _times(packs: int, mbs: int, allreduce: float, host: float = 1e9) -> Times:
    return Times([[1e-3] * mbs] * packs, [[2e-3] * mbs] * packs, [1e-4] * packs,
                 {"host->device": host, "device->host": host, "allreduce": allreduce})


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_simulated_allreduce_bytes_and_overlap(ranks: int) -> None:
    packs, mbs, g = 4, 2, 1 << 20
    placement = Placement.uniform(packs, Loc.HOST, Loc.DEVICE)
    single = lower(harmony(packs, mbs), placement, 1)
    dp = _dp("harmony", packs, mbs, placement, 1)
    sizes = _sizes(packs, mbs, g)
    base = simulate(single, sizes, _times(packs, mbs, 1e9))
    # all-reduces faster than a backward hide behind the next pack's backward
    fast = simulate(dp, sizes, _times(packs, mbs, 1e12), ranks)
    slow = simulate(dp, sizes, _times(packs, mbs, 1e8), ranks)
    assert fast.bytes_moved["allreduce"] == packs * ring_bytes(g, ranks) == \
        packs * 2 * (ranks - 1) * g // ranks
    for r in (fast, slow):
        assert {k: v for k, v in r.bytes_moved.items() if k != "allreduce"} == base.bytes_moved
    assert base.step_time is not None and fast.step_time is not None
    assert slow.step_time is not None
    assert fast.step_time <= base.step_time * 1.05
    # slow all-reduces: at least the ring bytes of every pack over the link
    assert slow.step_time >= packs * ring_bytes(g, ranks) / 1e8
    # gradients wait on the device for their all-reduce: one more G at most
    assert fast.peak[Loc.DEVICE] <= base.peak[Loc.DEVICE] + g


def test_ranks_on_one_machine_share_its_host_link() -> None:
    assert shared_bandwidth({"host->device": 8e9, "nvme->host": 2e9, "allreduce": 1e9}, 4) == \
        {"host->device": 2e9, "nvme->host": 5e8, "allreduce": 1e9}
    with pytest.raises(ValueError, match="local_ranks=0"):
        shared_bandwidth({}, 0)
    with pytest.raises(ValueError, match="ranks=0"):
        ring_bytes(10, 0)


def _profiles(layers: int) -> list[LayerProfile]:
    mib = 1 << 20
    return [LayerProfile(name=f"l{i}", w_bytes=4 * mib, g_bytes=4 * mib, in_bytes=1024,
                         in_grad_bytes=1024, out_bytes=1024, saved_bytes=4096, fwd_s=1e-3,
                         bwd_s=2e-3) for i in range(layers)]


def test_planner_predicts_allreduce_and_shared_links() -> None:
    profiles = _profiles(6)
    bw = {"host->device": 1e9, "device->host": 1e9, "allreduce": 2e9}
    budget = 20 << 20  # less than the 6 layers' W + G + K: weights must swap
    one = plan(profiles, "harmony", [2, 2], budget, None, 2.0, bw)
    two = plan(profiles, "harmony", [2, 2], budget, None, 2.0, bw, ranks=2, local_ranks=2,
               fixed=(one.bounds, one.placement))
    assert "allreduce" not in one.predicted.bytes_moved
    assert two.predicted.bytes_moved["allreduce"] == sum(two.sizes.g)
    assert sum(t.op is Op.ALLREDUCE for t in two.schedule.tasks) == len(two.bounds)
    # two ranks on two machines, and on one machine sharing its host link at half the rate
    apart = plan(profiles, "harmony", [2, 2], budget, None, 2.0, bw, ranks=2, local_ranks=1,
                 fixed=(one.bounds, one.placement))
    t_one, t_apart, t_two = (p.predicted.step_time for p in (one, apart, two))
    assert t_one is not None and t_apart is not None and t_two is not None
    assert t_two > t_apart >= t_one
    assert t_two >= two.predicted.bytes_moved["host->device"] / (bw["host->device"] / 2)
