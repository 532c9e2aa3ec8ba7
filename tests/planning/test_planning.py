"""The planner: budgets in, plan out."""

from __future__ import annotations

import pytest

from harmony.planning.chunks import STATE_SLACK
from harmony.planning.planner import InfeasiblePlan, greedy_bounds, pack_times, plan
from harmony.planning.profile import LayerProfile
from schedules.placement import Placement
from schedules.task import Kind, Loc, Op
from schedules.validate import validate

BW = {"host->device": 1e9, "device->host": 1e9}
SLOW = {"host->device": 1e7, "device->host": 1e7}


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
    (no weight traffic, update on the device); the plan moves fewer bytes than moving all.
    (On a link slow enough for traffic to cost time; see the next test for a fast one.)"""
    layers = _layers(8)
    everything = plan(layers, "harmony", [4, 4], None, None, 2.0, BW).predicted.peak[Loc.DEVICE]
    budget = int(everything * 0.6)
    p = plan(layers, "harmony", [4, 4], budget, None, 2.0, SLOW)
    assert {Loc.DEVICE, Loc.HOST} <= set(p.placement.w)
    assert p.predicted.peak[Loc.DEVICE] <= budget
    all_moved = plan(layers, "harmony", [4, 4], int(everything * 0.15), None, 2.0, SLOW)
    assert set(all_moved.placement.w) == {Loc.HOST}
    resident = sum(p.sizes.w[i] for i, loc in enumerate(p.placement.w) if loc is Loc.DEVICE)
    assert p.predicted.bytes_moved["host->device"] <= \
        all_moved.predicted.bytes_moved["host->device"] - resident


# -- forward groups --------------------------------------------------------------------------

def _grouping_layers(n: int = 6, why: dict[int, str] | None = None) -> list[LayerProfile]:
    """Layers whose forward over two micro-batches of 4 takes much less than twice one's:
    most of a forward's time is a cost per call (as on a GPU at small sizes)."""
    why = why or {}
    return [LayerProfile(f"l{i}", 1000, 1000, 40.0, 40.0, 100.0, 40.0, 1e-3, 3e-4, samples=4,
                         fwd_group_s=0.6e-3, group_samples=8, no_group=why.get(i, ""))
            for i in range(n)]


def test_choosing_forward_groups_is_faster_and_within_budget() -> None:
    layers, mbs = _grouping_layers(), [4] * 8
    everything = plan(layers, "harmony", mbs, None, None, 2.0, BW).predicted.peak[Loc.DEVICE]
    budget = everything // 2
    single = plan(layers, "harmony", mbs, budget, None, 2.0, BW)
    chosen = plan(layers, "harmony", mbs, budget, None, 2.0, BW, forward_group=None)
    assert single.forward_group == 1 and chosen.forward_group > 1
    assert chosen.predicted.step_time is not None and single.predicted.step_time is not None
    assert chosen.predicted.step_time < single.predicted.step_time
    assert chosen.predicted.peak[Loc.DEVICE] <= budget
    fwd = [t for t in chosen.schedule.tasks if t.op is Op.FWD]
    assert all(len(t.mbs) == min(chosen.forward_group, 8 - t.mbs[0]) for t in fwd)
    validate(chosen.schedule)


def test_no_faster_groups_no_groups() -> None:
    """Profiles without a timing of larger forwards (meta estimates: time per sample is
    constant) predict no gain: the planner keeps a forward per micro-batch."""
    layers = _layers()
    budget = plan(layers, "harmony", [4] * 4, None, None, 2.0, BW).predicted.peak[Loc.DEVICE] // 2
    chosen = plan(layers, "harmony", [4] * 4, budget, None, 2.0, BW, forward_group=None)
    assert chosen.forward_group == 1
    assert all(len(t.mbs) == 1 for t in chosen.schedule.tasks if t.op is Op.FWD)


def test_unlimited_memory_with_chosen_groups_gives_the_resident_plan() -> None:
    p = plan(_grouping_layers(), "harmony", [4] * 8, None, None, 2.0, BW, forward_group=None)
    assert all(loc is Loc.DEVICE for v in (p.placement.w, p.placement.k, p.placement.x)
               for loc in v)
    assert len(p.bounds) == 1  # one pack: its forward runs inside its backward


def test_packs_whose_layers_cannot_group_run_per_micro_batch() -> None:
    layers = _grouping_layers(6, {2: "draws random numbers in its forward (dropout)"})
    p = plan(layers, "harmony", [4] * 4, None, None, 2.0, BW, fixed=(
        ((0, 2), (2, 4), (4, 6)), Placement.uniform(3, Loc.HOST)), forward_group=2)
    fwd = " ".join(str(t) for t in p.schedule.tasks if t.op is Op.FWD)
    assert fwd == "F0.0-1 F0.2-3 F1.0 F1.1 F1.2 F1.3"
    assert p.ungrouped == ((1, 2, "draws random numbers in its forward (dropout)"),)
    text = p.describe([lp.name for lp in layers])
    assert "forward groups of 2 micro-batches: packs 0\n" in text
    assert "pack 1 one micro-batch at a time: layer 2 ('l2') draws random numbers" in text


def test_forward_groups_need_device_memory() -> None:
    layers, mbs = _grouping_layers(), [4] * 8
    fixed = (((0, 2), (2, 4), (4, 6)), Placement.uniform(3, Loc.HOST))
    peaks = [plan(layers, "harmony", mbs, None, None, 2.0, BW, fixed=fixed,
                  forward_group=g).predicted.peak[Loc.DEVICE] for g in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    with pytest.raises(InfeasiblePlan, match="or forward groups of fewer than 8 micro-batches"):
        plan(layers, "harmony", mbs, peaks[0], None, 2.0, BW, fixed=fixed, forward_group=8)
    # choosing, the planner keeps to what fits
    p = plan(layers, "harmony", mbs, peaks[1], None, 2.0, BW, fixed=fixed, forward_group=None)
    assert p.forward_group == 2 and p.predicted.peak[Loc.DEVICE] <= peaks[1]


def test_bad_forward_group() -> None:
    with pytest.raises(ValueError, match="forward_group=0 must be a positive int or None"):
        plan(_layers(), "harmony", [4, 4], None, None, 2.0, BW, forward_group=0)
    with pytest.raises(ValueError, match="forward groups need schedule='harmony'"):
        plan(_layers(), "per-microbatch", [4, 4], None, None, 2.0, BW, forward_group=2)


def test_pack_times_of_forward_groups() -> None:
    layers = _grouping_layers(4)
    t = pack_times(layers, ((0, 2), (2, 4)), [4, 4, 4, 2, 1], 1e-9, BW, forward_group=2)
    # two layers of 4 ms at 4 samples, 4.8 ms at 8: 3.2 ms per call + 0.2 ms per sample
    assert t.fwd_group[(0, 0, 1)] == pytest.approx(2 * 4.8e-3)
    assert t.fwd_group[(1, 2, 3)] == pytest.approx(2 * (4e-3 + 0.2e-3 * 2))  # 6 samples
    assert (0, 4, 4) not in t.fwd_group  # the last group is one micro-batch: its own time
    assert t.fwd[0] == pytest.approx([8e-3, 8e-3, 8e-3, 4e-3, 2e-3])  # as before


def test_a_clearly_faster_placement_of_the_same_tier_wins() -> None:
    """Keeping packs resident is tried first (least traffic), but on a fast link it can be
    slower than fewer packs with everything on the host; then the faster plan wins."""
    layers = _layers(8)
    everything = plan(layers, "harmony", [4, 4], None, None, 2.0, BW).predicted.peak[Loc.DEVICE]
    budget = int(everything * 0.6)
    resident = plan(layers, "harmony", [4, 4], budget, None, 2.0, SLOW)
    assert Loc.DEVICE in resident.placement.w
    same_on_fast = plan(layers, "harmony", [4, 4], budget, None, 2.0, BW,
                        fixed=(resident.bounds, resident.placement))
    p = plan(layers, "harmony", [4, 4], budget, None, 2.0, BW)
    assert p.predicted.peak[Loc.DEVICE] <= budget
    assert (p.predicted.step_time or 0.0) < (same_on_fast.predicted.step_time or 0.0) * 0.95


def test_refine_moves_activations_of_some_packs_onto_the_device() -> None:
    """The families place the activations of every swapped pack alike; refinement keeps those
    of the last packs on the device where the budget has room, when that is faster or as fast
    with fewer bytes moved."""
    layers = [LayerProfile(f"l{i}", 1000, 1000, 100.0, 100.0, 100.0, 100.0, 1e-5, 3e-5)
              for i in range(8)]
    budget = 10000
    p = plan(layers, "harmony", [4] * 4, budget, None, 2.0, BW)
    assert p.predicted.peak[Loc.DEVICE] <= budget
    swapped = [i for i, loc in enumerate(p.placement.w) if loc is Loc.HOST]
    xs = [p.placement.x[i] for i in swapped]
    assert xs[-1] is Loc.DEVICE and Loc.HOST in xs, p.placement
    assert xs == sorted(xs, key=lambda loc: loc is Loc.DEVICE)  # the last packs' stay
    uniform = Placement(p.placement.w, p.placement.k,
                        tuple(Loc.HOST if i in swapped else x
                              for i, x in enumerate(p.placement.x)))
    alike = plan(layers, "harmony", [4] * 4, budget, None, 2.0, BW,
                 fixed=(p.bounds, uniform), prefetch=p.schedule.prefetch)
    assert sum(p.predicted.bytes_moved.values()) < sum(alike.predicted.bytes_moved.values())
    assert (p.predicted.step_time or 0.0) <= (alike.predicted.step_time or 0.0) * 1.001


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
