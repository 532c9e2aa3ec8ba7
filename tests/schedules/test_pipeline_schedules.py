"""Pipeline schedules: per-rank task lists with SEND/RECV, written out whole; the validator's
matching of sends and receives across ranks; the simulator's bytes between ranks."""

from __future__ import annotations

import itertools
import re

import pytest

from schedules.generators import harmony
from schedules.lower import lower
from schedules.pipeline import (
    balance,
    bubble,
    check_stages,
    format_clock,
    peer_link,
    pipeline,
    stage_schedule,
    validate_pipeline,
)
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.simulate import Sizes, simulate
from schedules.task import Kind, Loc, Op, Task
from schedules.validate import ScheduleError, validate


def test_send_and_recv_text_round_trips() -> None:
    for text, task in [(">X2.0", Task(Op.SEND, 2, 0, Kind.X)),
                       ("<D2.1", Task(Op.RECV, 2, 1, Kind.D))]:
        assert str(task) == text
        assert Task.parse(text) == task
    with pytest.raises(ValueError, match="only activations"):
        Task.parse(">W2")


def test_two_ranks_four_packs_written_out() -> None:
    ranks = pipeline(4, 2, [(0, 2), (2, 4)])
    assert [str(s) for s in ranks] == [
        "F0.0 F0.1 F1.0 >X2.0 F1.1 >X2.1 <D2.0 B1.0 <D2.1 B1.1 U1 B0.0 B0.1 U0",
        "<X2.0 F2.0 <X2.1 F2.1 B3.0 B3.1 U3 B2.0 >D2.0 B2.1 >D2.1 U2",
    ]
    assert [s.stage for s in ranks] == [(0, 2), (2, 4)]
    validate_pipeline(ranks)


def test_three_ranks_one_pack_each_written_out() -> None:
    ranks = pipeline(3, 2, [(0, 1), (1, 2), (2, 3)])
    assert [str(s) for s in ranks] == [
        "F0.0 >X1.0 F0.1 >X1.1 <D1.0 B0.0 <D1.1 B0.1 U0",
        "<X1.0 F1.0 >X2.0 <X1.1 F1.1 >X2.1 <D2.0 B1.0 >D1.0 <D2.1 B1.1 >D1.1 U1",
        "<X2.0 B2.0 >D2.0 <X2.1 B2.1 >D2.1 U2",
    ]
    validate_pipeline(ranks)


def test_the_clock_shows_the_bubble() -> None:
    ranks = pipeline(4, 2, [(0, 2), (2, 4)])
    assert format_clock(ranks) == (
        "rank 0  F0.0 F0.1 F1.0 F1.1    .    .    .    .    . B1.0 B1.1   U1 B0.0 B0.1   U0\n"
        "rank 1     .    .    . F2.0 F2.1 B3.0 B3.1   U3 B2.0 B2.1   U2    .    .    .    .\n")
    assert bubble(ranks) == pytest.approx(1 - 18 / 30)  # 18 tasks in 2 ranks x 15 ticks


def test_one_rank_is_plain_harmony() -> None:
    (only,) = pipeline(5, 3, [(0, 5)])
    assert str(only) == str(harmony(5, 3))


@pytest.mark.parametrize("where", [Loc.DEVICE, Loc.HOST])
@pytest.mark.parametrize(("packs", "stages"), [
    (4, [(0, 2), (2, 4)]), (3, [(0, 1), (1, 3)]), (5, [(0, 1), (1, 4), (4, 5)])])
def test_lowered_ranks_validate(packs: int, stages: list[tuple[int, int]], where: Loc) -> None:
    ranks = [lower(s, Placement.uniform(packs, where)) for s in pipeline(packs, 3, stages)]
    validate_pipeline(ranks)
    # the ranks keep their SEND/RECV in order through lowering
    for plain, low in zip(pipeline(packs, 3, stages), ranks):
        assert [t for t in low.tasks if t.op.is_comm] == [t for t in plain.tasks if t.op.is_comm]


def _drop(s: Schedule, word: str) -> Schedule:
    words = str(s).split()
    words.remove(word)
    return Schedule.parse(" ".join(words), name=s.name, packs=s.packs,
                          micro_batches=s.micro_batches, stage=s.stage, rank=s.rank)


def test_unmatched_send_is_marked_in_the_grid() -> None:
    r0, r1 = pipeline(4, 2, [(0, 2), (2, 4)])
    with pytest.raises(ScheduleError) as err:
        validate_pipeline([r0, _drop(r1, "<X2.1")])
    msg = str(err.value)
    assert "rank 0 sends X2.1 to rank 1 as message 1 of that link, but rank 1 receives " \
           "nothing" in msg
    assert err.value.index == r0.tasks.index(Task.parse(">X2.1"))
    assert re.search(r"^P2 .*>>X2\.1<", msg, re.M), msg  # the grid marks the send


def test_unmatched_recv_is_marked_in_the_grid() -> None:
    r0, r1 = pipeline(4, 2, [(0, 2), (2, 4)])
    bad = _drop(r1, ">D2.0")
    with pytest.raises(ScheduleError) as err:
        validate_pipeline([r0, bad])
    assert "rank 0 receives D2.0 from rank 1, which never sends it" not in str(err.value)
    assert "rank 1 sends D2.1 to rank 0 as message 0 of that link, but rank 0 receives " \
           "D2.0 there" in str(err.value)
    assert err.value.index == bad.tasks.index(Task.parse(">D2.1"))


def test_recv_without_any_send_is_marked() -> None:
    r0, r1 = pipeline(4, 2, [(0, 2), (2, 4)])
    with pytest.raises(ScheduleError) as err:
        validate_pipeline([_drop(r0, ">X2.1"), r1])
    assert "rank 1 receives X2.1 from rank 0, which never sends it" in str(err.value)
    assert err.value.index == r1.tasks.index(Task.parse("<X2.1"))
    assert re.search(r"^P2 .*><X2\.1<", str(err.value), re.M)


def test_swapped_order_deadlocks_and_is_marked() -> None:
    # rank 0 receives D2.0 before it sends X2.0, which rank 1 needs first: both wait forever
    r0 = Schedule.parse("F0.0 <D2.0 F1.0 >X2.0 B1.0 U1 B0.0 U0", name="pipeline", packs=4,
                        micro_batches=1, stage=(0, 2), rank=0)
    r1 = stage_schedule(4, 1, [(0, 2), (2, 4)], 1)
    validate(r0)  # fine on its own
    with pytest.raises(ScheduleError, match="rank 0 waits forever") as err:
        validate_pipeline([r0, r1])
    assert err.value.index == 1


def test_rank_validator_rejects_a_value_that_does_not_cross_its_boundary() -> None:
    s = Schedule.parse(str(stage_schedule(4, 1, [(0, 2), (2, 4)], 0)).replace(">X2.0", ">X1.0"),
                       name="pipeline", packs=4, micro_batches=1, stage=(0, 2), rank=0)
    with pytest.raises(ScheduleError, match="X1.0 does not cross this rank's stage boundary"):
        validate(s)


def test_rank_validator_rejects_compute_of_another_stage() -> None:
    s = Schedule.parse(str(stage_schedule(4, 1, [(0, 2), (2, 4)], 0)) + " U3", name="pipeline",
                       packs=4, micro_batches=1, stage=(0, 2), rank=0)
    with pytest.raises(ScheduleError, match="pack 3 is not on this rank's stage"):
        validate(s)


@pytest.mark.parametrize(("stages", "message"), [
    ([(0, 2)], "has 1 stages but there are 2 ranks"),
    ([(0, 2), (3, 4)], "stage 1 is 3..4 but must start at 2"),
    ([(0, 2), (2, 3)], "ends at 3 but the chain has 4 packs"),
    ([(0, 0), (0, 4)], "stage 0 is 0..0"),
    ("nope", "must be a list of"),
])
def test_bad_stages_name_the_value(stages: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_stages(stages, 4, 2)  # type: ignore[arg-type]


def test_more_ranks_than_packs() -> None:
    with pytest.raises(ValueError, match="3 ranks for 2 packs"):
        balance([1.0, 1.0], 3)
    with pytest.raises(ValueError, match="3 ranks but only 2 packs"):
        check_stages([(0, 1), (1, 2), (2, 2)], 2, 3)


@pytest.mark.parametrize(("costs", "ranks", "want"), [
    ([1, 1, 1, 1], 2, ((0, 2), (2, 4))),
    ([4, 1, 1, 1, 1], 2, ((0, 1), (1, 5))),
    ([1, 2, 3, 4, 5, 6], 3, ((0, 3), (3, 5), (5, 6))),
    ([5, 5], 2, ((0, 1), (1, 2))),
])
def test_balance_minimises_the_largest_stage(costs: list[float], ranks: int,
                                             want: tuple[tuple[int, int], ...]) -> None:
    got = balance(costs, ranks)
    assert got == want
    largest = max(sum(costs[a:b]) for a, b in got)
    # no other contiguous split into non-empty stages has a smaller largest stage
    for cuts in itertools.combinations(range(1, len(costs)), ranks - 1):
        edges = (0, *cuts, len(costs))
        assert max(sum(costs[a:b]) for a, b in itertools.pairwise(edges)) >= largest


def test_simulator_counts_bytes_between_ranks() -> None:
    packs, stages = 4, [(0, 2), (2, 4)]
    x = [[10 * (p + 1) + m for m in range(2)] for p in range(packs)]
    d = [[100 * (p + 1) + m for m in range(2)] for p in range(packs)]
    z = [[0, 0]] * packs
    sizes = Sizes([8] * packs, [8] * packs, [16] * packs, x, d, z, z)
    got = [{k: v for k, v in simulate(lower(s, Placement.uniform(packs, Loc.DEVICE)),
                                      sizes).bytes_moved.items() if k.startswith("rank")}
           for s in pipeline(packs, 2, stages)]
    sent_x = x[2][0] + x[2][1]
    sent_d = d[2][0] + d[2][1]
    assert got[0] == {"rank0->rank1": sent_x, "rank1->rank0": sent_d}
    assert got[1] == {"rank0->rank1": sent_x, "rank1->rank0": sent_d}
    # each rank charges only its own packs' weights and optimizer state (no activations here)
    bare = Sizes([8] * packs, [8] * packs, [16] * packs, z, z, z, z)
    peak0 = simulate(lower(pipeline(packs, 2, stages)[0], Placement.uniform(packs, Loc.HOST)),
                     bare).peak[Loc.HOST]
    assert peak0 == 2 * (8 + 16) + 8  # packs 0 and 1, plus one pack's gradients for its update
    r0, r1 = pipeline(2, 1, [(0, 1), (1, 2)])  # F0.0 >X1.0 <D1.0 ... / <X1.0 B1.0 >D1.0 U1
    assert [peer_link(0, r0.tasks[1]), peer_link(0, r0.tasks[2])] == \
        ["rank0->rank1", "rank1->rank0"]
    assert [peer_link(1, r1.tasks[0]), peer_link(1, r1.tasks[2])] == \
        ["rank0->rank1", "rank1->rank0"]
