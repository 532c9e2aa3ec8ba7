"""Lowering: the swaps a placement implies, written out and checked against lower.py's rules.

The expected texts below were derived by hand from the rules in ``schedules/lower.py``'s
docstring (weights and gradients ``prefetch`` runs ahead, activations one task ahead, keep a
value whose reload would be issued right away, write behind or drop, DEL after the last use,
gradients out before an update off the device), then checked against the code.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from schedules import lower as lower_module
from schedules.effects import effect
from schedules.generators import GENERATORS, harmony, per_microbatch, resident
from schedules.lower import lower
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Kind, Loc, Op, Ref, Task
from schedules.validate import validate

H, D, N = Loc.HOST, Loc.DEVICE, Loc.NVME

PLACEMENTS: dict[str, Callable[[int], Placement]] = {
    "all-device": lambda packs: Placement.uniform(packs, D),
    "wk-host-x-device": lambda packs: Placement.uniform(packs, H, D),
    "all-host": lambda packs: Placement.uniform(packs, H),
    "wk-nvme-x-host": lambda packs: Placement.uniform(packs, N, H),
}
SIZES = [(p, m) for p in range(1, 5) for m in range(1, 5)]


# -- whole schedules, written out ------------------------------------------------------------------

def test_harmony_all_host_prefetch_1() -> None:
    # W1 comes in before F0.0 (one run ahead); W0 stays through B1.* because B1.* is the run
    # right before B0.*; D1.1 leaves after B1.1 since its reload is two tasks later.
    s = lower(harmony(2, 2), Placement.uniform(2, H), prefetch=1)
    assert str(s) == (
        "+W0 +X0.0 +X0.1 +W1 F0.0 ~X0.0 F0.1 ~X0.1 "
        "B1.0 !X1.0 -D1.0 B1.1 ~W1 !X1.1 -G1 -D1.1 +X0.0 +D1.0 U1 !G1 "
        "+X0.1 +D1.1 B0.0 !X0.0 !D1.0 B0.1 ~W0 !X0.1 !D1.1 -G0 U0 !G0")
    assert (s.placement, s.prefetch, s.name, s.lowered) == (Placement.uniform(2, H), 1,
                                                            "harmony", True)


def test_harmony_all_host_prefetch_0() -> None:
    s = lower(harmony(3, 2), Placement.uniform(3, H), prefetch=0)
    assert str(s) == (
        "+W0 +X0.0 F0.0 ~X0.0 -X1.0 +X0.1 F0.1 ~W0 ~X0.1 -X1.1 "
        "+W1 +X1.0 F1.0 ~X1.0 -X2.0 +X1.1 F1.1 ~W1 ~X1.1 -X2.1 "
        "+W2 +X2.0 B2.0 !X2.0 -D2.0 +X2.1 B2.1 ~W2 !X2.1 -G2 -D2.1 U2 !G2 "
        "+W1 +X1.0 +D2.0 B1.0 !X1.0 !D2.0 -D1.0 +X1.1 +D2.1 B1.1 ~W1 !X1.1 !D2.1 -G1 -D1.1 U1 !G1 "
        "+W0 +X0.0 +D1.0 B0.0 !X0.0 !D1.0 +X0.1 +D1.1 B0.1 ~W0 !X0.1 !D1.1 -G0 U0 !G0")


def test_harmony_all_device() -> None:
    # Only the input batch moves: it is the caller's, on the host.
    s = lower(harmony(2, 2), Placement.uniform(2, D), prefetch=0)
    assert str(s) == (
        "+X0.0 F0.0 ~X0.0 +X0.1 F0.1 ~X0.1 B1.0 !X1.0 B1.1 !X1.1 U1 !G1 "
        "+X0.0 B0.0 !X0.0 !D1.0 +X0.1 B0.1 !X0.1 !D1.1 U0 !G0")


def test_per_microbatch_all_host_prefetch_0() -> None:
    # Each micro-batch brings every pack's weights back; gradients leave between micro-batches
    # and come back for the next accumulation (+G1 before B1.1).
    s = lower(per_microbatch(2, 2), Placement.uniform(2, H), prefetch=0)
    assert str(s) == (
        "+W0 +X0.0 F0.0 ~W0 ~X0.0 +W1 B1.0 ~W1 !X1.0 -G1 +W0 +X0.0 B0.0 !X0.0 !D1.0 -G0 "
        "+X0.1 F0.1 ~W0 ~X0.1 +W1 +G1 B1.1 ~W1 !X1.1 -G1 +W0 +X0.1 +G0 B0.1 ~W0 !X0.1 !D1.1 -G0 "
        "U0 !G0 U1 !G1")


def test_resident_all_host_prefetch_0() -> None:
    # Same moves as per-microbatch, plus the kept autograd graphs S0.m deleted after B0.m.
    s = lower(resident(2, 2), Placement.uniform(2, H), prefetch=0)
    assert str(s) == (
        "+W0 +X0.0 F0.0 ~W0 ~X0.0 +W1 B1.0 ~W1 !X1.0 -G1 +W0 +X0.0 B0.0 !X0.0 !D1.0 !S0.0 -G0 "
        "+X0.1 F0.1 ~W0 ~X0.1 +W1 +G1 B1.1 ~W1 !X1.1 -G1 "
        "+W0 +X0.1 +G0 B0.1 ~W0 !X0.1 !D1.1 !S0.1 -G0 U0 !G0 U1 !G1")
    assert not s.recompute


def test_single_pack() -> None:
    assert str(lower(harmony(1, 1), Placement.uniform(1, H), prefetch=0)) == (
        "+W0 +X0.0 B0.0 ~W0 !X0.0 -G0 U0 !G0")


def _doc_example() -> str:
    lines = (lower_module.__doc__ or "").splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("Harmony, 3 packs"))
    return lines[i + 2].strip().removesuffix("...").strip()


def test_lower_doc_example() -> None:
    s = lower(harmony(3, 2), Placement.uniform(3, H), prefetch=1)
    assert str(s).startswith(_doc_example())


# -- every generator, placement, prefetch and size ------------------------------------------------

def _touched(s: Schedule) -> dict[int, set[Ref]]:
    """The values each compute task (by index in ``s.tasks``) reads or produces."""
    assert s.placement is not None
    out: dict[int, set[Ref]] = {}
    grads: set[int] = set()
    for i, t in enumerate(s.tasks):
        if not t.op.is_compute:
            continue
        e = effect(t, s.packs, s.recompute, s.placement, t.pack in grads)
        out[i] = {r for r, _ in e.reads} | set(e.produces)
        if t.op is Op.BWD:
            grads.add(t.pack)
        elif t.op is Op.UPD:
            grads.discard(t.pack)
    return out


def _check_lowered(s: Schedule, original: Schedule) -> None:
    assert s.placement is not None
    validate(s)
    assert s.compute_tasks() == list(original.tasks)
    touched = _touched(s)
    last_use = {ref: i for i, refs in touched.items() for ref in refs}
    # Per value: when it came onto the device (produced or loaded) and when it left.
    events: dict[Ref, list[str]] = {}
    last_compute = -1
    for i, t in enumerate(s.tasks):
        if t.op.is_compute:
            e = effect(t, s.packs, s.recompute, s.placement, False)
            for ref in e.produces:
                if ref.kind is not Kind.G or ref not in events:
                    events.setdefault(ref, []).append("made")
            last_compute = i
            continue
        ref = t.ref
        if t.op is Op.SWAP_IN:
            # A load comes no earlier than the previous eviction of the same value.
            assert events.get(ref, ["out"])[-1] == "out", f"{t} at {i} before an eviction"
            events.setdefault(ref, []).append("in")
        elif t.op in (Op.SWAP_OUT, Op.FREE):
            assert events.get(ref, [""])[-1] in ("in", "made"), f"{t} at {i}"
            events[ref].append("out")
        else:
            # DEL comes right after the value's last use, before the next compute task.
            assert last_use[ref] == last_compute, f"{t} at {i} is not right after its last use"
            events.setdefault(ref, []).append("del")
    for ref, ev in events.items():
        if ref.kind not in (Kind.W, Kind.K):
            assert ev.count("del") == 1, (ref, ev)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("where", sorted(PLACEMENTS))
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_lowered_schedules_validate(name: str, where: str, prefetch: int) -> None:
    # NVMe homes lower like host homes (only the links differ): fewer sizes suffice.
    for packs, mbs in SIZES if where != "wk-nvme-x-host" else [(1, 2), (3, 3), (4, 2)]:
        original = GENERATORS[name](packs, mbs)
        s = lower(original, PLACEMENTS[where](packs), prefetch)
        _check_lowered(s, original)
        moves = [t for t in s.tasks if t.op in (Op.SWAP_IN, Op.SWAP_OUT, Op.FREE)]
        if where == "all-device":
            # Only the input batch (the caller's, on the host) is loaded, and dropped again.
            assert all(t.kind is Kind.X and t.pack == 0 for t in moves), str(s)
            assert all(t.op is not Op.SWAP_OUT for t in moves)
        else:
            # An update off the device first receives its gradients, written behind.
            for p in range(packs):
                u = s.tasks.index(Task(Op.UPD, p))
                g_moves = [t for t in s.tasks[:u] if t.kind is Kind.G and t.pack == p]
                assert g_moves[-1] == Task(Op.SWAP_OUT, p, None, Kind.G), str(s)
        if where == "wk-host-x-device":
            assert not any(t.kind is Kind.D or (t.kind is Kind.X and t.pack > 0) for t in moves)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_activations_load_one_task_ahead(name: str, prefetch: int) -> None:
    """With prefetch 0 an X or D arrives just before its use, otherwise one task earlier."""
    for packs, mbs in SIZES:
        s = lower(GENERATORS[name](packs, mbs), Placement.uniform(packs, H), prefetch)
        compute = [i for i, t in enumerate(s.tasks) if t.op.is_compute]
        touched = _touched(s)
        for i, t in enumerate(s.tasks):
            if t.op is not Op.SWAP_IN or t.kind not in (Kind.X, Kind.D):
                continue
            issued_before = next(n for n, j in enumerate(compute) if j > i)
            user = next(n for n, j in enumerate(compute) if j > i and t.ref in touched[j])
            assert issued_before == (user if prefetch == 0 else max(user - 1, 0)), (
                f"{t} at {i} in {s}")


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
@pytest.mark.parametrize("packs", [1, 2, 3, 4, 5])
def test_harmony_weights_arrive_prefetch_runs_ahead(packs: int, prefetch: int) -> None:
    # Runs: F0.* F1.* ... F(P-2).* then B(P-1).*; the first load of Wp precedes run
    # max(p - prefetch, 0).
    s = lower(harmony(packs, 2), Placement.uniform(packs, H), prefetch)
    for p in range(packs):
        i = s.tasks.index(Task(Op.SWAP_IN, p, None, Kind.W))
        first_use = next(t for t in s.tasks[i:] if t.op.is_compute)
        run = max(p - prefetch, 0)
        assert first_use == (Task(Op.FWD, run, 0) if run < packs - 1
                             else Task(Op.BWD, packs - 1, 0)), str(s)


# -- weight traffic ------------------------------------------------------------------------------

def harmony_loads(packs: int, prefetch: int) -> dict[int, int]:
    """Loads of W per pack for harmony, everything on the host, derived from the rules.

    The last pack is loaded once (its forward is fused into its backward). Pack p < P-1 is used
    by forward run p and backward run 2P-2-p; it stays on the device between them when its
    backward load would be issued at the start of run p+1, i.e. when 2P-2-p-prefetch <= p+1;
    otherwise it is loaded twice.
    """
    return {p: 1 if p == packs - 1 or 2 * packs - 2 - p - prefetch <= p + 1 else 2
            for p in range(packs)}


def test_harmony_loads_three_packs() -> None:
    s = lower(harmony(3, 4), Placement.uniform(3, H), 0)
    assert s.weight_loads() == {0: 2, 1: 2, 2: 1}
    s = lower(harmony(3, 4), Placement.uniform(3, H), 1)  # W1 stays through B2.*
    assert s.weight_loads() == {0: 2, 1: 1, 2: 1}


@pytest.mark.parametrize("where", ["all-host", "wk-host-x-device", "wk-nvme-x-host"])
@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
def test_harmony_loads_at_most_twice(where: str, prefetch: int) -> None:
    for packs in range(1, 6):
        for mbs in (1, 3):
            loads = lower(harmony(packs, mbs), PLACEMENTS[where](packs), prefetch).weight_loads()
            assert loads == harmony_loads(packs, prefetch), (packs, mbs)
            assert loads[0] == (2 if 2 * packs - 3 - prefetch > 0 else 1)
            assert max(loads.values()) <= 2


@pytest.mark.parametrize("mbs", [1, 2, 3, 4])
def test_per_microbatch_loads(mbs: int) -> None:
    M = mbs
    expected = {
        # packs: {prefetch: loads}
        1: {0: {0: 1}, 1: {0: 1}, 2: {0: 1}},
        # B0.m and F0.m+1 form one run, so W0 comes M+1 times at prefetch 0; with prefetch 1
        # both packs fit and never leave.
        2: {0: {0: M + 1, 1: M}, 1: {0: 1, 1: 1}, 2: {0: 1, 1: 1}},
        # W1 is one run away from each of its uses once prefetch >= 1.
        3: {0: {0: M + 1, 1: 2 * M, 2: M}, 1: {0: M + 1, 1: 1, 2: M}, 2: {0: M + 1, 1: 1, 2: M}},
        4: {0: {0: M + 1, 1: 2 * M, 2: 2 * M, 3: M}, 1: {0: M + 1, 1: M + 1, 2: M, 3: M},
            2: {0: M + 1, 1: M + 1, 2: M, 3: M}},
    }
    for packs, by_prefetch in expected.items():
        for prefetch, loads in by_prefetch.items():
            s = lower(per_microbatch(packs, mbs), Placement.uniform(packs, H), prefetch)
            assert s.weight_loads() == loads, (packs, prefetch)
            if packs == 4:  # no pack is kept: every one comes at least once per micro-batch
                assert min(loads.values()) >= mbs


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("mbs", [2, 4, 8, 16])
def test_harmony_moves_at_most_two_over_m_of_per_microbatch(mbs: int, prefetch: int) -> None:
    packs = 4
    h = sum(lower(harmony(packs, mbs), Placement.uniform(packs, H), prefetch)
            .weight_loads().values())
    pm = sum(lower(per_microbatch(packs, mbs), Placement.uniform(packs, H), prefetch)
             .weight_loads().values())
    assert h * mbs <= 2 * pm
    assert h <= 2 * packs - 1


# -- errors --------------------------------------------------------------------------------------

def test_lowering_twice_raises() -> None:
    s = lower(harmony(2, 2), Placement.uniform(2, H))
    with pytest.raises(ValueError, match="schedule 'harmony' is already lowered"):
        lower(s, Placement.uniform(2, H))


def test_placement_must_match() -> None:
    with pytest.raises(ValueError, match="placement has 2 packs, schedule has 3"):
        lower(harmony(3, 1), Placement.uniform(2, H))


def test_negative_prefetch() -> None:
    with pytest.raises(ValueError, match="prefetch=-1 must be >= 0"):
        lower(harmony(3, 1), Placement.uniform(3, H), prefetch=-1)
