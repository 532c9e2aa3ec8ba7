"""Tasks, schedules, placements and the compute-only generators.

Schedules are compared as written-out text, as torchgpipe and torch.distributed.pipelining do:
a wrong order shows up as a readable diff of two lines.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules import generators
from schedules.generators import GENERATORS, generate, harmony, per_microbatch, resident
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Kind, Loc, Op, Ref, Task
from schedules.validate import validate

MOVES = [Op.SWAP_IN, Op.SWAP_OUT, Op.FREE, Op.DEL]


# -- tasks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "task"), [
    ("F2.0", Task(Op.FWD, 2, 0)),
    ("B2.0", Task(Op.BWD, 2, 0)),
    ("U2", Task(Op.UPD, 2)),
    ("+W2", Task(Op.SWAP_IN, 2, None, Kind.W)),
    ("-G2", Task(Op.SWAP_OUT, 2, None, Kind.G)),
    ("+X1.3", Task(Op.SWAP_IN, 1, 3, Kind.X)),
    ("~W2", Task(Op.FREE, 2, None, Kind.W)),
    ("!X1.3", Task(Op.DEL, 1, 3, Kind.X)),
    ("-K0", Task(Op.SWAP_OUT, 0, None, Kind.K)),
    ("+D4.1", Task(Op.SWAP_IN, 4, 1, Kind.D)),
    ("!S0.7", Task(Op.DEL, 0, 7, Kind.S)),
    ("B12.345", Task(Op.BWD, 12, 345)),
    ("F1.0-3", Task(Op.FWD, 1, 0, last=3)),
    ("F7.12-13", Task(Op.FWD, 7, 12, last=13)),
])
def test_task_text(text: str, task: Task) -> None:
    assert str(task) == text
    assert Task.parse(text) == task


@pytest.mark.parametrize("op", MOVES, ids=lambda o: o.name)
@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_every_move_op_and_kind_round_trips(op: Op, kind: Kind) -> None:
    mb = 3 if kind.per_micro_batch else None
    task = Task(op, 5, mb, kind)
    expected = op.value + kind.value + "5" + (".3" if kind.per_micro_batch else "")
    assert str(task) == expected
    assert Task.parse(expected) == task
    assert task.ref == Ref(kind, 5, mb)
    assert Task.move(op, task.ref) == task


def test_ops_and_kinds() -> None:
    assert [op for op in Op if op.is_compute] == [Op.FWD, Op.BWD, Op.UPD]
    assert [k for k in Kind if k.per_micro_batch] == [Kind.X, Kind.D, Kind.S]
    assert [str(Ref(Kind.W, 3)), str(Ref(Kind.X, 1, 2))] == ["W3", "X1.2"]


def test_task_module_doc_example() -> None:
    assert repr(Task.parse("+X1.3")) == (
        "Task(op=<Op.SWAP_IN: '+'>, pack=1, mb=3, kind=<Kind.X: 'X'>)")
    assert Task.parse("  B1.3\n") == Task(Op.BWD, 1, 3)


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    op = draw(st.sampled_from(list(Op)))
    pack = draw(st.integers(0, 10_000))
    kinds = [Kind.X, Kind.D] if op.is_comm else list(Kind)  # only X and D cross ranks
    kind = None if op.is_compute else draw(st.sampled_from(kinds))
    if op.is_compute:
        needs_mb = op is not Op.UPD
    else:
        assert kind is not None
        needs_mb = kind.per_micro_batch
    mb = draw(st.integers(0, 10_000)) if needs_mb else None
    last = None
    if op is Op.FWD and draw(st.booleans()):
        assert mb is not None
        last = mb + draw(st.integers(1, 100))
    return Task(op, pack, mb, kind, last)


@given(tasks())
def test_random_task_round_trips(task: Task) -> None:
    assert Task.parse(str(task)) == task


@settings(max_examples=50)
@given(st.lists(tasks(), max_size=30))
def test_random_schedule_round_trips(ts: list[Task]) -> None:
    s = Schedule("custom", 1 + max((t.pack for t in ts), default=-1),
                 1 + max((t.mbs[-1] for t in ts if t.mb is not None), default=-1), tuple(ts))
    assert Schedule.parse(str(s)) == s


@pytest.mark.parametrize("text", ["", "F", "Z1", "F1.", "+W", "W2", "F-1.0", "F1.0.0", "B 1.0",
                                  "+Q1", "++W1", "U2 U3", "f1.0", "F1-3", "F1.0-", "F1.0-2-3",
                                  "U1-2"])
def test_parse_error_names_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"cannot parse task {text!r}")):
        Task.parse(text)


@pytest.mark.parametrize("text", ["U2.0", "F1", "B0", "+X1", "!D2", "+W1.0", "-K0.0", "B1.0-3",
                                  "+X1.0-3", "F1.3-3", "F1.3-2"])
def test_parse_of_an_invalid_task_raises(text: str) -> None:
    with pytest.raises(ValueError):
        Task.parse(text)


@pytest.mark.parametrize("text", ["U2.0", "+X1"])
def test_parse_of_an_invalid_task_names_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        Task.parse(text)


def test_schedule_parse_error_names_the_bad_word() -> None:
    with pytest.raises(ValueError, match="'X0.0'"):
        Schedule.parse("F0.0 X0.0 B0.0")


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Task(Op.UPD, 2, 0), "UPD takes no micro-batch"),
    (lambda: Task(Op.FWD, 2), "FWD of pack 2: needs a micro-batch"),
    (lambda: Task(Op.BWD, 2), "BWD of pack 2: needs a micro-batch"),
    (lambda: Task(Op.FWD, 2, 0, Kind.X), "takes no kind"),
    (lambda: Task(Op.UPD, 2, None, Kind.W), "takes no kind"),
    (lambda: Task(Op.SWAP_IN, 2), "SWAP_IN of pack 2 needs a kind"),
    (lambda: Task(Op.SWAP_OUT, 2), "SWAP_OUT of pack 2 needs a kind"),
    (lambda: Task(Op.FREE, 2, 0), "FREE of pack 2 needs a kind"),
    (lambda: Task(Op.DEL, 2), "DEL of pack 2 needs a kind"),
    (lambda: Task(Op.SWAP_IN, 2, 0, Kind.W), "kind W takes no micro-batch"),
    (lambda: Task(Op.SWAP_OUT, 2, None, Kind.X), "kind X needs a micro-batch"),
    (lambda: Task(Op.FWD, -1, 0), "pack and micro-batch must be >= 0"),
    (lambda: Task(Op.UPD, -3), "pack and micro-batch must be >= 0"),
    (lambda: Task(Op.BWD, 0, -1), "pack and micro-batch must be >= 0"),
    (lambda: Task(Op.DEL, -1, 0, Kind.X), "pack and micro-batch must be >= 0"),
    (lambda: Task(Op.BWD, 1, 0, last=3), "only a forward runs over a group"),
    (lambda: Task(Op.SWAP_IN, 1, 0, Kind.X, 2), "only a forward runs over a group"),
    (lambda: Task(Op.UPD, 1, last=2), "only a forward runs over a group"),
    (lambda: Task(Op.FWD, 1, 2, last=2), "micro-batches 2..2 must end after it starts"),
    (lambda: Task(Op.FWD, 1, 4, last=1), "micro-batches 4..1 must end after it starts"),
])
def test_invalid_task_raises(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_forward_group_covers_its_micro_batches() -> None:
    assert Task.parse("F1.2-5").mbs == range(2, 6)
    assert Task(Op.BWD, 1, 3).mbs == range(3, 4)
    assert Task(Op.UPD, 1).mbs == range(0)
    assert repr(Task.parse("F1.0-3")) == "Task(op=<Op.FWD: 'F'>, pack=1, mb=0, kind=None, last=3)"
    # a schedule's micro-batch count covers the groups' last micro-batches
    assert Schedule.parse("F0.0-4 B1.0").micro_batches == 5
    assert Schedule.parse("F0.0-4 F1.0 F1.1").forward_group == 5
    assert harmony(3, 4).forward_group == 1


def test_compute_task_has_no_ref() -> None:
    with pytest.raises(ValueError, match="B1.0 is a compute task"):
        _ = Task(Op.BWD, 1, 0).ref


# -- schedules -----------------------------------------------------------------------------------

def test_schedule_text_round_trip() -> None:
    s = harmony(3, 2)
    back = Schedule.parse(str(s), name="harmony")
    assert back == s
    assert (back.packs, back.micro_batches, back.recompute, back.lowered) == (3, 2, True, False)


def test_schedule_parse_counts_and_overrides() -> None:
    s = Schedule.parse("+X0.4 B2.0 U1")
    assert (s.name, s.packs, s.micro_batches) == ("custom", 3, 5)
    s = Schedule.parse("B0.0 U0", name="x", packs=4, micro_batches=2, recompute=False, prefetch=1)
    assert (s.name, s.packs, s.micro_batches, s.recompute, s.prefetch) == ("x", 4, 2, False, 1)
    empty = Schedule.parse("  ")
    assert (empty.tasks, empty.packs, empty.micro_batches, str(empty)) == ((), 0, 0, "")


def test_compute_tasks_and_with_tasks() -> None:
    s = Schedule.parse("+W0 +X0.0 B0.0 ~W0 !X0.0 U0")
    assert " ".join(map(str, s.compute_tasks())) == "B0.0 U0"
    placement = Placement.uniform(1, Loc.HOST)
    lowered = s.with_tasks(s.compute_tasks(), placement, 2)
    assert (str(lowered), lowered.placement, lowered.prefetch, lowered.lowered) == (
        "B0.0 U0", placement, 2, True)


def test_weight_loads_counts_swap_ins_of_w_only() -> None:
    s = Schedule.parse("+W0 +G0 +X0.0 ~W0 +W0 -W1 +K1 +W2", packs=4)
    assert s.weight_loads() == {0: 2, 1: 0, 2: 1, 3: 0}


def test_uses_tier() -> None:
    s = harmony(2, 1)
    assert not s.uses_tier(Loc.DEVICE)  # no placement yet
    placed = s.with_tasks(list(s.tasks), Placement((Loc.DEVICE, Loc.NVME), (Loc.DEVICE, Loc.NVME),
                                                   (Loc.HOST, Loc.HOST)), 1)
    assert [placed.uses_tier(loc) for loc in Loc] == [True, True, True]
    placed = s.with_tasks(list(s.tasks), Placement.uniform(2, Loc.DEVICE), 1)
    assert [placed.uses_tier(loc) for loc in Loc] == [True, False, False]


def test_grid_marks_the_task() -> None:
    assert harmony(3, 2).grid(mark=4) == (
        "           0      1      2      3      4      5      6      7      8      9     10     11     12\n"  # noqa: E501
        "P0      F0.0   F0.1      .      .      .      .      .      .      .      .   B0.0   B0.1     U0\n"  # noqa: E501
        "P1         .      .   F1.0   F1.1      .      .      .   B1.0   B1.1     U1      .      .      .\n"  # noqa: E501
        "P2         .      .      .      . >B2.0<   B2.1     U2      .      .      .      .      .      .\n"  # noqa: E501
    )


def test_grid_wraps() -> None:
    assert harmony(2, 2).grid(width=5) == (
        "         0    1    2    3    4\n"
        "P0    F0.0 F0.1    .    .    .\n"
        "P1       .    . B1.0 B1.1   U1\n"
        "\n"
        "         5    6    7\n"
        "P0    B0.0 B0.1   U0\n"
        "P1       .    .    .\n"
    )


def test_grid_shows_moves_in_their_pack_row() -> None:
    assert Schedule.parse("+W0 F0.0 ~W0 B1.0 U1 B0.0 U0").grid(mark=0) == (
        "          0     1     2     3     4     5     6\n"
        "P0    >+W0<  F0.0   ~W0     .     .  B0.0    U0\n"
        "P1        .     .     .  B1.0    U1     .     .\n"
    )


# -- generators ----------------------------------------------------------------------------------

def test_harmony_text() -> None:
    assert str(harmony(3, 2)) == "F0.0 F0.1 F1.0 F1.1 B2.0 B2.1 U2 B1.0 B1.1 U1 B0.0 B0.1 U0"
    assert str(harmony(1, 1)) == "B0.0 U0"
    assert str(harmony(1, 3)) == "B0.0 B0.1 B0.2 U0"
    assert str(harmony(2, 3)) == "F0.0 F0.1 F0.2 B1.0 B1.1 B1.2 U1 B0.0 B0.1 B0.2 U0"
    assert str(harmony(4, 1)) == "F0.0 F1.0 F2.0 B3.0 U3 B2.0 U2 B1.0 U1 B0.0 U0"


def test_per_microbatch_text() -> None:
    assert str(per_microbatch(3, 2)) == (
        "F0.0 F1.0 B2.0 B1.0 B0.0 F0.1 F1.1 B2.1 B1.1 B0.1 U0 U1 U2")
    assert str(per_microbatch(1, 2)) == "B0.0 B0.1 U0"
    assert str(per_microbatch(2, 3)) == "F0.0 B1.0 B0.0 F0.1 B1.1 B0.1 F0.2 B1.2 B0.2 U0 U1"


def test_resident_text() -> None:
    assert str(resident(3, 2)) == str(per_microbatch(3, 2))
    assert str(resident(2, 1)) == "F0.0 B1.0 B0.0 U0 U1"


def test_generator_metadata() -> None:
    for name, gen in GENERATORS.items():
        s = gen(3, 2)
        assert (s.name, s.packs, s.micro_batches, s.placement, s.prefetch) == (name, 3, 2, None,
                                                                                None)
        assert generate(name, 3, 2) == s
    assert [GENERATORS[n](2, 2).recompute for n in ("harmony", "per-microbatch", "resident")] == [
        True, True, False]


def test_generators_module_doc_matches() -> None:
    """The three-pack picture in the module docstring is what the generators return."""
    doc = {}
    for line in (generators.__doc__ or "").splitlines():
        words = line.split()
        if words and words[0] in ("harmony", "per-microbatch"):
            doc[words[0]] = " ".join(w for w in words[1:] if w != "|")
    assert doc == {"harmony": str(harmony(3, 2)), "per-microbatch": str(per_microbatch(3, 2))}


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("packs", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 4])
def test_every_compute_task_exactly_once(name: str, packs: int, micro_batches: int) -> None:
    s = generate(name, packs, micro_batches)
    counts = Counter(s.tasks)
    expected = [Task(Op.FWD, p, m) for p in range(packs - 1) for m in range(micro_batches)]
    expected += [Task(Op.BWD, p, m) for p in range(packs) for m in range(micro_batches)]
    expected += [Task(Op.UPD, p) for p in range(packs)]
    assert counts == Counter(expected)
    assert sum(t.op is Op.FWD for t in s.tasks) == (packs - 1) * micro_batches
    validate(s)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_dependencies_come_first(name: str) -> None:
    """Forward p.m after forward p-1.m; backward p.m after backward p+1.m; U p after B p.*."""
    P, M = 4, 3
    pos = {t: i for i, t in enumerate(generate(name, P, M).tasks)}
    for m in range(M):
        for p in range(1, P - 1):
            assert pos[Task(Op.FWD, p - 1, m)] < pos[Task(Op.FWD, p, m)]
        assert pos[Task(Op.FWD, P - 2, m)] < pos[Task(Op.BWD, P - 1, m)]
        for p in range(P - 1):
            assert pos[Task(Op.BWD, p + 1, m)] < pos[Task(Op.BWD, p, m)]
    for p in range(P):
        assert max(pos[Task(Op.BWD, p, m)] for m in range(M)) < pos[Task(Op.UPD, p)]


def test_harmony_updates_just_in_time() -> None:
    tasks = harmony(4, 3).tasks
    for p in range(4):
        i = tasks.index(Task(Op.UPD, p))
        assert tasks[i - 1] == Task(Op.BWD, p, 2)


def test_harmony_forward_groups_text() -> None:
    assert str(harmony(3, 4, group=2)) == (
        "F0.0-1 F0.2-3 F1.0-1 F1.2-3 B2.0 B2.1 B2.2 B2.3 U2 B1.0 B1.1 B1.2 B1.3 U1 "
        "B0.0 B0.1 B0.2 B0.3 U0")
    # the last group may be shorter; packs not in `grouped` run a forward per micro-batch
    assert str(harmony(3, 5, group=2, grouped={1})) == (
        "F0.0 F0.1 F0.2 F0.3 F0.4 F1.0-1 F1.2-3 F1.4 B2.0 B2.1 B2.2 B2.3 B2.4 U2 "
        "B1.0 B1.1 B1.2 B1.3 B1.4 U1 B0.0 B0.1 B0.2 B0.3 B0.4 U0")
    assert str(harmony(2, 3, group=8)) == "F0.0-2 B1.0 B1.1 B1.2 U1 B0.0 B0.1 B0.2 U0"
    assert str(harmony(2, 3, group=1)) == str(harmony(2, 3))
    assert str(harmony(2, 2, True, group=2)) == "F0.0-1 B1.0 B1.1 B0.0 B0.1 U1 U0"
    assert " ".join(map(str, generators.forwards(1, 5, 2))) == "F1.0-1 F1.2-3 F1.4"


@pytest.mark.parametrize("packs", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 5])
@pytest.mark.parametrize("group", [1, 2, 3, 8])
def test_forward_groups_cover_every_micro_batch_once(packs: int, micro_batches: int,
                                                    group: int) -> None:
    s = generate("harmony", packs, micro_batches, group=group)
    covered = Counter((t.pack, m) for t in s.tasks if t.op is Op.FWD for m in t.mbs)
    assert covered == Counter((p, m) for p in range(packs - 1) for m in range(micro_batches))
    assert all(len(t.mbs) <= group for t in s.tasks if t.op is Op.FWD)
    assert s.forward_group == (min(group, micro_batches) if packs > 1 else 1)
    validate(s)


@pytest.mark.parametrize("name", ["per-microbatch", "resident"])
def test_only_harmony_groups_forwards(name: str) -> None:
    with pytest.raises(ValueError, match=f"schedule {name!r} runs a forward per micro-batch "
                                         r"\(group=2\); forward groups need schedule='harmony'"):
        generate(name, 3, 4, group=2)
    assert generate(name, 3, 4, group=1) == generate(name, 3, 4)


@pytest.mark.parametrize("group", [0, -1, 1.5, True])
def test_bad_forward_group(group: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"group={group!r} must be a positive int")):
        harmony(3, 4, group=group)  # type: ignore[arg-type]


def test_unknown_schedule_lists_the_names() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'gpipe'") as err:
        generate("gpipe", 2, 2)
    assert "['harmony', 'per-microbatch', 'resident']" in str(err.value)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_size_errors(name: str) -> None:
    with pytest.raises(ValueError, match="at least one pack, got packs=0"):
        generate(name, 0, 2)
    with pytest.raises(ValueError, match="at least one micro-batch, got -1"):
        generate(name, 2, -1)
    with pytest.raises(ValueError, match="at least one micro-batch, got 0"):
        GENERATORS[name](1, 0)


# -- placement -----------------------------------------------------------------------------------

def test_placement_uniform_and_home() -> None:
    p = Placement.uniform(3, Loc.NVME, Loc.DEVICE)
    assert (p.packs, p.w, p.k, p.x) == (3, (Loc.NVME,) * 3, (Loc.NVME,) * 3, (Loc.DEVICE,) * 3)
    assert Placement.uniform(2, Loc.HOST).x == (Loc.HOST, Loc.HOST)
    mixed = Placement((Loc.DEVICE, Loc.HOST, Loc.NVME), (Loc.DEVICE, Loc.HOST, Loc.NVME),
                      (Loc.NVME,) * 3)
    assert [mixed.update_loc(pack) for pack in range(3)] == [Loc.DEVICE, Loc.HOST, Loc.HOST]
    assert [mixed.home(Kind.G, pack) for pack in range(3)] == [Loc.DEVICE, Loc.HOST, Loc.HOST]
    assert [mixed.home(Kind.X, pack) for pack in range(3)] == [Loc.HOST, Loc.NVME, Loc.NVME]
    homes = {k: [p.home(k, pack) for pack in range(3)] for k in Kind}
    assert homes == {
        Kind.W: [Loc.NVME] * 3,
        Kind.G: [Loc.HOST] * 3,  # gradients go where the update runs: the host, for K on NVMe
        Kind.K: [Loc.NVME] * 3,
        Kind.X: [Loc.HOST, Loc.DEVICE, Loc.DEVICE],  # the input batch is the caller's, on host
        Kind.D: [Loc.DEVICE] * 3,
        Kind.S: [Loc.DEVICE] * 3,
    }


def test_placement_errors() -> None:
    h, d = Loc.HOST, Loc.DEVICE
    with pytest.raises(ValueError, match="differ in length: w=2, k=2, x=1"):
        Placement((h, h), (h, h), (h,))
    with pytest.raises(ValueError, match="pack 1: weights at host but optimizer state at device"):
        Placement((h, h), (h, d), (h, h))


def test_placement_json_round_trip() -> None:
    p = Placement((Loc.DEVICE, Loc.NVME), (Loc.DEVICE, Loc.NVME), (Loc.HOST, Loc.NVME))
    data = p.to_json()
    assert data == {"w": ["device", "nvme"], "k": ["device", "nvme"], "x": ["host", "nvme"]}
    assert Placement.from_json(data) == p
