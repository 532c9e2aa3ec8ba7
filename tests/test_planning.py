"""The planner: budgets in, plan out."""

from __future__ import annotations

import pytest

from harmony.chunks import STATE_SLACK
from harmony.planning import InfeasiblePlan, greedy_bounds, plan
from harmony.profile import LayerProfile
from schedules.task import Kind, Loc, Op

BW = {"host->device": 1e9, "device->host": 1e9}


def _layers(n: int = 6, w: int = 1000) -> list[LayerProfile]:
    return [LayerProfile(f"l{i}", w, w, 40.0, 40.0, 100.0, 40.0, 1e-4, 3e-4) for i in range(n)]


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch", "resident"])
def test_unlimited_memory_gives_the_resident_plan(schedule: str) -> None:
    p = plan(_layers(), schedule, [4, 4, 4], None, None, 2.0, BW)
    assert all(loc is Loc.DEVICE for v in (p.placement.w, p.placement.k, p.placement.x)
               for loc in v)
    moves = [t for t in p.schedule.tasks if t.op in (Op.SWAP_IN, Op.SWAP_OUT)]
    assert all(t.kind is Kind.X and t.pack == 0 for t in moves)  # only the input batch moves


def test_budget_below_the_state_moves_weights_off_the_device() -> None:
    layers = _layers()
    everything = plan(layers, "harmony", [4, 4], None, None, 2.0, BW).predicted.peak[Loc.DEVICE]
    p = plan(layers, "harmony", [4, 4], everything // 2, None, 2.0, BW)
    assert p.predicted.peak[Loc.DEVICE] <= everything // 2
    assert Loc.HOST in p.placement.w


def test_infeasible_explains_and_gives_the_least_that_works() -> None:
    layers = _layers()
    with pytest.raises(InfeasiblePlan, match=r"device_memory=.*too small.*Use device_memory>=")\
            as err:
        plan(layers, "harmony", [4, 4], 10, None, 2.0, BW)
    least = err.value.device_needed
    p = plan(layers, "harmony", [4, 4], least, None, 2.0, BW)
    assert p.predicted.peak[Loc.DEVICE] <= least


def test_greedy_bounds_cover_every_layer_once() -> None:
    for packs in range(1, 8):
        bounds = greedy_bounds([5, 1, 1, 9, 2, 2, 2], packs)
        assert bounds[0][0] == 0 and bounds[-1][1] == 7
        assert all(a < b for a, b in bounds)
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


def test_packs_that_fit_the_host_stay_there_the_rest_go_to_nvme() -> None:
    layers = _layers(8)
    state = sum(lp.w_bytes * 3 for lp in layers)  # W + K (k_ratio 2)
    p = plan(layers, "harmony", [4, 4], 6000, state // 2, 2.0, BW, nvme=True)
    assert Loc.HOST in p.placement.w and Loc.NVME in p.placement.w
    assert p.predicted.peak[Loc.HOST] <= state // 2
    n = len(p.placement.w)
    on_host = [p.placement.w[i] is Loc.HOST for i in range(n)]
    assert on_host == sorted(on_host)  # the last packs (updated first) are the host's


def test_room_on_the_device_keeps_some_packs_resident() -> None:
    """Between "everything fits" and "nothing stays": the packs that fit stay on the device
    (no weight traffic, update on the device); the plan moves fewer bytes than moving all."""
    layers = _layers(8)
    everything = plan(layers, "harmony", [4, 4], None, None, 2.0, BW).predicted.peak[Loc.DEVICE]
    budget = int(everything * 0.6)
    p = plan(layers, "harmony", [4, 4], budget, None, 2.0, BW)
    assert {Loc.DEVICE, Loc.HOST} <= set(p.placement.w)
    assert p.predicted.peak[Loc.DEVICE] <= budget
    all_moved = plan(layers, "harmony", [4, 4], int(everything * 0.15), None, 2.0, BW)
    assert set(all_moved.placement.w) == {Loc.HOST}
    resident = sum(p.sizes.w[i] for i, loc in enumerate(p.placement.w) if loc is Loc.DEVICE)
    assert p.predicted.bytes_moved["host->device"] <= \
        all_moved.predicted.bytes_moved["host->device"] - resident


def _many_parameters(n: int = 4) -> list[LayerProfile]:
    """Layers of eight 1000-byte parameters each (W = G = 8000 bytes a layer)."""
    return [LayerProfile(f"l{i}", 8000, 8000, 40.0, 40.0, 100.0, 40.0, 1e-4, 3e-4,
                         params=[(1000, 1000)] * 8) for i in range(n)]


def test_update_chunks_when_a_pack_does_not_fit_the_host() -> None:
    """W + K of one layer is 24000 bytes (AdamW-like: K = 2 x G): a host budget of 20000
    cannot hold one whole-pack update, but three chunks and the pack's gradients fit."""
    layers = _many_parameters()
    roomy = plan(layers, "harmony", [4, 4], 30000, 40000, 2.0, BW, nvme=True,
                 update_chunk="auto")
    assert roomy.update_chunk is None and not roomy.sizes.chunks  # whole packs fit: kept
    with pytest.raises(InfeasiblePlan,
                       match=r"host_memory=19.53KiB is too small.*holds its pack.s master"):
        plan(layers, "harmony", [4, 4], 30000, 20000, 2.0, BW, nvme=True)
    p = plan(layers, "harmony", [4, 4], 30000, 20000, 2.0, BW, nvme=True, update_chunk="auto")
    assert p.update_chunk is not None and p.predicted.peak[Loc.HOST] <= 20000
    nvme = [i for i, loc in enumerate(p.placement.k) if loc is Loc.NVME]
    assert nvme
    for i in nvme:  # each pack's W and K split over its chunks, none over the budget
        chunks = p.sizes.chunks_of(i)
        assert len(chunks) >= 4
        assert sum(w for w, _ in chunks) == p.sizes.w[i]
        # (K: k_ratio x G, and room for each parameter's scalar state such as AdamW's step)
        assert sum(k for _, k in chunks) == pytest.approx(p.sizes.k[i] + 8 * STATE_SLACK,
                                                          abs=len(chunks))
        assert all(w + k <= p.update_chunk for w, k in chunks)
    # the time the update's chunks wait for their reads is in the prediction
    assert p.predicted.step_time is not None and roomy.predicted.step_time is not None
    assert p.predicted.step_time > roomy.predicted.step_time
    fixed = plan(layers, "harmony", [4, 4], 30000, None, 2.0, BW, nvme=True, update_chunk=3000,
                 fixed=(p.bounds, p.placement))
    assert fixed.update_chunk == 3000 and all(
        fixed.sizes.chunks_of(i) == [(1000, 2000 + STATE_SLACK)] * 8 for i in nvme)
