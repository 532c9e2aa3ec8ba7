"""The validator: hand-broken schedules fail with a message naming the problem and a grid that
marks the bad task; every valid lowering passes, and every single-task edit of one is caught."""

from __future__ import annotations

import pytest

from schedules.generators import GENERATORS, harmony
from schedules.lower import lower
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Loc, Task
from schedules.validate import ScheduleError, validate

H, D = Loc.HOST, Loc.DEVICE

# lower(harmony(3, 2), Placement.uniform(3, HOST), prefetch=0); see test_lower.py.
HARMONY_HOST = (
    "+W0 +X0.0 F0.0 ~X0.0 -X1.0 +X0.1 F0.1 ~W0 ~X0.1 -X1.1 "
    "+W1 +X1.0 F1.0 ~X1.0 -X2.0 +X1.1 F1.1 ~W1 ~X1.1 -X2.1 "
    "+W2 +X2.0 B2.0 !X2.0 -D2.0 +X2.1 B2.1 ~W2 !X2.1 -G2 -D2.1 U2 !G2 "
    "+W1 +X1.0 +D2.0 B1.0 !X1.0 !D2.0 -D1.0 +X1.1 +D2.1 B1.1 ~W1 !X1.1 !D2.1 -G1 -D1.1 U1 !G1 "
    "+W0 +X0.0 +D1.0 B0.0 !X0.0 !D1.0 +X0.1 +D1.1 B0.1 ~W0 !X0.1 !D1.1 -G0 U0 !G0")


def lowered(text: str = HARMONY_HOST, packs: int = 3, where: Loc = H) -> Schedule:
    return Schedule.parse(text, name="harmony", packs=packs, micro_batches=2,
                          placement=Placement.uniform(packs, where), prefetch=0)


def edit(s: Schedule, old: str | None, new: str | None, nth: int = 0,
         at: int | None = None) -> Schedule:
    """Replace (or drop, with new=None) the nth ``old``; or insert ``new`` at index ``at``."""
    words = str(s).split()
    if old is None:
        assert at is not None and new is not None
        words.insert(at, new)
    else:
        i = [j for j, w in enumerate(words) if w == old][nth]
        words[i:i + 1] = [] if new is None else [new]
    return s.with_tasks([Task.parse(w) for w in words], s.placement, s.prefetch)


def expect_error(s: Schedule, message: str, marked: str | None) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        validate(s)
    err = info.value
    text = str(err)
    assert isinstance(err, ValueError)
    assert message in text, text
    if marked is None:
        assert err.index is None
        assert ">" not in text.split("\n", 1)[1]
    else:
        assert err.index is not None
        assert str(s.tasks[err.index]) == marked
        assert f" at task {err.index} ({marked}): " in text
        assert f">{marked}<" in text
        assert text.count("<") == 1
    return err


def test_the_base_schedule_is_what_lower_returns_and_valid() -> None:
    s = lower(harmony(3, 2), Placement.uniform(3, H), prefetch=0)
    assert str(s) == HARMONY_HOST
    validate(s)
    validate(lowered())


def test_validate_doc_example() -> None:
    assert validate(harmony(3, 2)) is None


def test_missing_stash_load_marks_the_backward() -> None:
    s = edit(lowered(), "+X1.0", None, nth=1)  # the load before B1.0
    err = expect_error(s, "needs X1.0 on the device; its home is host: add +X1.0 before it",
                       "B1.0")
    assert err.index == str(s).split().index("B1.0")
    assert str(err).startswith(f"schedule 'harmony' at task {err.index} (B1.0): needs X1.0")


def test_missing_weight_load() -> None:
    expect_error(edit(lowered(), "+W1", None), "needs W1 on the device; its home is host: "
                 "add +W1 before it", "F1.0")


def test_missing_gradient_write_back() -> None:
    expect_error(edit(lowered(), "-G2", None), "needs G2 at host, which holds no valid copy", "U2")


def test_missing_del_of_a_value_at_home() -> None:
    expect_error(edit(lowered(), "!G2", None), "ends with G2 never deleted", None)


def test_missing_del_of_a_device_copy() -> None:
    expect_error(edit(lowered(), "!X2.0", None), "ends with device copies of X2.0", None)


def test_free_of_a_stale_home_copy() -> None:
    expect_error(edit(lowered(), "-X1.0", "~X1.0"),
                 "freeing X1.0 would lose it: its home holds no valid copy (use -X1.0)", "~X1.0")


def test_update_while_a_device_copy_would_go_stale() -> None:
    expect_error(edit(lowered(), "~W1", None, nth=1),
                 "updates W1 at home while a device copy would go stale", "U1")


def test_update_before_the_last_backward() -> None:
    s = Schedule.parse("F0.0 F0.1 F1.0 F1.1 B2.0 U2 B2.1 B1.0 B1.1 U1 B0.0 B0.1 U0")
    err = expect_error(s, "update before the pack's last backward (1 left)", "U2")
    assert err.index == 5
    low = edit(lowered("+X0.0 F0.0 ~X0.0 +X0.1 F0.1 ~X0.1 B1.0 !X1.0 B1.1 !X1.1 U1 !G1 "
                       "+X0.0 B0.0 !X0.0 !D1.0 +X0.1 B0.1 !X0.1 !D1.1 U0 !G0", 2, D),
               "U1", None)
    expect_error(edit(low, None, "U1", at=7), "update before the pack's last backward", "U1")


def test_duplicate_compute_task() -> None:
    s = edit(harmony(3, 2), None, "B1.0", at=8)
    err = expect_error(s, "runs twice", "B1.0")
    assert err.index == 8


def test_duplicate_load() -> None:
    err = expect_error(edit(lowered(), None, "+W0", at=1), "W0 is already on the device", "+W0")
    assert err.index == 1


def test_missing_update() -> None:
    expect_error(edit(harmony(3, 2), "U0", None), "never runs U0", None)
    expect_error(edit(lowered(), "U0", None), "never runs U0", None)


def test_missing_forward_lists_them() -> None:
    s = Schedule.parse("B0.0 U0", packs=1, micro_batches=1)
    validate(s)
    expect_error(Schedule.parse("", packs=1, micro_batches=10),
                 "never runs B0.0, B0.1, B0.2, B0.3, B0.4, B0.5, B0.6, B0.7 ...", None)


def test_out_of_range() -> None:
    err = expect_error(edit(harmony(3, 2), None, "F0.2", at=2),
                       "refers to pack/micro-batch outside 3 packs x 2 micro-batches", "F0.2")
    assert err.index == 2


def test_out_of_range_pack_is_marked_in_the_grid() -> None:
    err = expect_error(edit(harmony(3, 2), None, "F7.0", at=2),
                       "refers to pack/micro-batch outside 3 packs x 2 micro-batches", "F7.0")
    assert err.index == 2


def test_forward_of_the_last_pack() -> None:
    s = Schedule.parse("F0.0 F1.0 B1.0 B0.0 U1 U0", packs=2)
    expect_error(s, "F1.0: the last pack's forward is fused into its backward", "F1.0")


def test_needs_a_value_not_made_yet() -> None:
    expect_error(Schedule.parse("B1.0 F0.0 B0.0 U1 U0"),
                 "needs X1.0, which does not exist yet (or was deleted)", "B1.0")


def test_data_moves_need_a_placement() -> None:
    expect_error(Schedule.parse("+W0 B0.0 U0"),
                 "data moves need a placement (lower the schedule first)", "+W0")


@pytest.mark.parametrize(("old", "new", "nth", "message", "marked"), [
    (None, "+D1.0", 0, "D1.0 does not exist", "+D1.0"),
    (None, "~W0", 0, "W0 has no device copy to free", "~W0"),
    (None, "!W0", 3, "W0 is permanent and cannot be deleted", "!W0"),
    (None, "-W0", 0, "W0 is not a device copy of a value homed elsewhere", "-W0"),
    ("-X1.0", "-X1.0 -X1.0", 0, "X1.0 is not a device copy of a value homed elsewhere", "-X1.0"),
    ("!X0.1", "!X0.1 !X0.1", 0, "X0.1 does not exist", "!X0.1"),
])
def test_bad_moves(old: str | None, new: str, nth: int, message: str, marked: str) -> None:
    s = lowered()
    if old is None:
        s = edit(s, None, new, at=nth)
    else:
        words = str(s).split()
        i = words.index(old)
        s = s.with_tasks([Task.parse(w) for w in words[:i] + new.split() + words[i + 1:]],
                         s.placement, s.prefetch)
    expect_error(s, message, marked)


def test_swap_in_of_a_value_living_on_the_device() -> None:
    s = lowered("+X0.0 F0.0 ~X0.0 +X0.1 F0.1 ~X0.1 B1.0 !X1.0 B1.1 !X1.1 U1 !G1 "
                "+X0.0 B0.0 !X0.0 !D1.0 +X0.1 B0.1 !X0.1 !D1.1 U0 !G0", 2, D)
    validate(s)
    expect_error(edit(s, None, "+W1", at=6), "W1 lives on the device; nothing to swap in", "+W1")
    expect_error(edit(s, None, "-D1.0", at=8), "D1.0 is not a device copy of a value homed "
                 "elsewhere", "-D1.0")


def test_ends_with_a_weight_on_the_device() -> None:
    expect_error(edit(lowered(), None, "+W2", at=len(lowered().tasks)),
                 "ends with device copies of W2", None)


def _every_lowering():
    for _, gen in sorted(GENERATORS.items()):
        for where in (Placement.uniform, lambda p, loc: Placement.uniform(p, loc, D)):
            for prefetch in (0, 1):
                for packs, mbs in ((2, 2), (3, 1)):
                    yield lower(gen(packs, mbs), where(packs, H), prefetch)
    for where in (Placement.uniform, lambda p, loc: Placement.uniform(p, loc, D)):
        for prefetch in (0, 1):  # forward groups: one of two, one of two and one alone
            yield lower(harmony(3, 3, group=2), where(3, H), prefetch)


# -- forward groups ----------------------------------------------------------------------------

# lower(harmony(2, 3, group=2), Placement.uniform(2, HOST), prefetch=0)
GROUPED = ("+W0 +X0.0 +X0.1 F0.0-1 ~X0.0 ~X0.1 -X1.0 -X1.1 +X0.2 F0.2 ~W0 ~X0.2 -X1.2 "
           "+W1 +X1.0 B1.0 !X1.0 -D1.0 +X1.1 B1.1 !X1.1 -D1.1 +X1.2 B1.2 ~W1 !X1.2 -G1 -D1.2 "
           "U1 !G1 +W0 +X0.0 +D1.0 B0.0 !X0.0 !D1.0 +X0.1 +D1.1 B0.1 !X0.1 !D1.1 "
           "+X0.2 +D1.2 B0.2 ~W0 !X0.2 !D1.2 -G0 U0 !G0")


def grouped() -> Schedule:
    return Schedule.parse(GROUPED, name="harmony", packs=2, micro_batches=3,
                          placement=Placement.uniform(2, H), prefetch=0)


def test_a_lowered_forward_group_is_valid() -> None:
    s = lower(harmony(2, 3, group=2), Placement.uniform(2, H), prefetch=0)
    assert str(s) == GROUPED
    validate(s)
    validate(harmony(4, 5, group=3))


def test_forward_group_overlapping_another_forward() -> None:
    s = edit(harmony(2, 3, group=2), "F0.2", "F0.1-2")
    expect_error(s, "runs the forward of micro-batch 1 twice", "F0.1-2")
    expect_error(edit(grouped(), "F0.2", "F0.1"), "runs the forward of micro-batch 1 twice",
                 "F0.1")


def test_forward_group_missing_a_micro_batch() -> None:
    expect_error(edit(harmony(2, 3, group=2), "F0.0-1", "F0.0"),
                 "needs X1.1, which does not exist yet (or was deleted)", "B1.1")


def test_forward_group_needs_every_input_on_the_device() -> None:
    expect_error(edit(grouped(), "+X0.1", None),
                 "needs X0.1 on the device; its home is host: add +X0.1 before it", "F0.0-1")


def test_forward_group_past_the_last_micro_batch() -> None:
    expect_error(edit(harmony(2, 3), "F0.2", "F0.2-3"),
                 "refers to pack/micro-batch outside 2 packs x 3 micro-batches", "F0.2-3")


def test_forward_group_without_recompute() -> None:
    s = Schedule.parse("F0.0-1 B1.0 B0.0 B1.1 B0.1 U0 U1", recompute=False)
    expect_error(s, "F0.0-1: a forward group needs a schedule that recomputes", "F0.0-1")


def test_forward_group_of_the_last_pack() -> None:
    s = Schedule.parse("F0.0-1 F1.0-1 B1.0 B1.1 B0.0 B0.1 U1 U0", packs=2)
    expect_error(s, "F1.0-1: the last pack's forward is fused into its backward", "F1.0-1")


def test_every_single_removal_or_duplication_is_caught() -> None:
    """Lowering adds no needless move, and the validator notices any missing or doubled task:
    a doubled task is reported at the copy."""
    for s in _every_lowering():
        validate(s)
        for i in range(len(s.tasks)):
            dropped = s.with_tasks(list(s.tasks[:i] + s.tasks[i + 1:]), s.placement, s.prefetch)
            with pytest.raises(ScheduleError):
                validate(dropped)
            doubled = s.with_tasks(list(s.tasks[:i + 1] + s.tasks[i:]), s.placement, s.prefetch)
            with pytest.raises(ScheduleError) as info:
                validate(doubled)
            assert info.value.index == i + 1, (str(s), i)
