"""Tied weights across packs (harmony/model/tied.py) against plain PyTorch gradient accumulation.

The model is TinyTransformer with its head's projection tied to the token embedding, so the
tied tensor is used by the first and the last layer, which the tests put in different packs.

Tolerance. Plain autograd adds the two uses' gradients micro-batch by micro-batch; harmony sums
each pack's micro-batches and then adds the sharer's sum into the owner's: the same terms in
another order, a few ulps apart. After one step only the tied tensor may differ (everything
else is checked bitwise); after several steps the difference reaches every weight through the
forward. Weights are compared per tensor as ``max|got - want| <= RTOL * max(max|want|, 1e-3)``
(tests.models.assert_weights_close) with RTOL = 1e-5; observed: up to 2e-6. AdamW runs with
eps=1e-3: attention key biases have a zero gradient in exact arithmetic (softmax ignores a
shift), so their computed gradients are pure rounding noise that Adam's default eps=1e-8 would
blow up to full-size steps, turning ulps of reordering into 1e-2 differences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import harmony
from harmony.model.tied import TiedWeights, untie
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Loc, Op, Task
from tests.models import (
    assert_weights_close,
    cross_entropy_tokens,
    layers_of,
    tied_transformer,
    training_state_bytes,
)

RTOL = 1e-5
BUDGET = training_state_bytes(tied_transformer(), 8) // 2  # forces weights off the device
TIED = ("embed.tok.weight", "head.out.weight")


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-3)


def _sgd(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.1)


def _batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randint(0, 11, (7, 8), generator=g), torch.randint(0, 11, (7, 8), generator=g))
            for _ in range(steps)]


def _reference(make_opt, batches, mbs: int = 3, max_norm: float | None = None,
               ) -> dict[str, torch.Tensor]:
    """Plain PyTorch on the tied model: gradient accumulation (and clip_grad_norm_)."""
    net = tied_transformer()
    layers = layers_of(net)
    opt = make_opt(list(net.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            h = xm
            for layer in layers:
                h = layer(h)
            (cross_entropy_tokens(h, ym) * (ym.shape[0] / y.shape[0])).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
           exact: tuple[str, ...] = ()) -> None:
    assert got.keys() == want.keys()
    assert torch.equal(got[TIED[0]], got[TIED[1]]), "the tied keys must hold one value"
    for k in exact:
        assert torch.equal(got[k], want[k]), (k, float((got[k] - want[k]).abs().max()))
    assert_weights_close(got, want, RTOL)


# Homes of the packs (embed | blocks | head), one plan per case; "budget" lets the planner
# choose under a device budget that forces swapping.
HOMES = {
    "device": (Loc.DEVICE, Loc.DEVICE, Loc.DEVICE),
    "host": (Loc.HOST, Loc.HOST, Loc.HOST),
    "nvme": (Loc.NVME, Loc.NVME, Loc.NVME),
    "owner-nvme": (Loc.NVME, Loc.HOST, Loc.DEVICE),
    "sharer-nvme": (Loc.DEVICE, Loc.HOST, Loc.NVME),
}


def _trainer(tmp_path: Path, homes: str, schedule: str, make_opt, **kw) -> harmony.Trainer:
    if homes == "budget":
        return harmony.Trainer(tied_transformer(), cross_entropy_tokens, optimizer=make_opt,
                               micro_batch_size=3, schedule=schedule, device_memory=BUDGET,
                               **kw)
    t = harmony.Trainer(tied_transformer(), cross_entropy_tokens, optimizer=make_opt,
                        micro_batch_size=3, schedule=schedule, nvme_dir=str(tmp_path), **kw)
    w = HOMES[homes]
    x = tuple(Loc.HOST if loc is Loc.NVME else loc for loc in w)
    t.planner.fixed = (((0, 1), (1, 4), (4, 5)), Placement(w, w, x))  # embed | 3 blocks | head
    return t


def _check_split(t: harmony.Trainer) -> None:
    plan = t.plan
    assert plan is not None and len(plan.bounds) > 1, "the tied users must be in two packs"
    assert t.runtime is not None and t.runtime.ties is not None


# resident keeps everything on the device: its packs are all homed there
CASES = [(s, h) for s in ("harmony", "per-microbatch") for h in [*HOMES, "budget"]] + [
    ("resident", "device")]


@pytest.mark.parametrize(("schedule", "homes"), CASES)
def test_one_step_only_the_tied_tensor_rounds_differently(tmp_path: Path, homes: str,
                                                          schedule: str) -> None:
    """One SGD step: every untied weight is bitwise plain PyTorch's; the tied one is close."""
    batches = _batches(1)
    with _trainer(tmp_path, homes, schedule, _sgd) as t:
        t.step(*batches[0])
        _check_split(t)
        got = t.state_dict()
    want = _reference(_sgd, batches)
    _close(got, want, exact=tuple(k for k in want if k not in TIED))
    assert not torch.equal(want[TIED[0]], tied_transformer().embed.tok.weight)


@pytest.mark.parametrize(("schedule", "homes"), [
    c for c in CASES if c[1] in ("device", "host", "nvme", "sharer-nvme", "budget")])
def test_three_adamw_steps_match_plain_pytorch(tmp_path: Path, homes: str, schedule: str,
                                               ) -> None:
    batches = _batches()
    with _trainer(tmp_path, homes, schedule, _adamw) as t:
        for b in batches:
            t.step(*b)
        _check_split(t)
        if homes == "budget":
            assert Loc.HOST in t.plan.placement.w  # type: ignore[union-attr]
            assert t.stats.peak_bytes["device"] <= BUDGET
        got = t.state_dict()
    _close(got, _reference(_adamw, batches))


@pytest.mark.parametrize("homes", ["host", "owner-nvme", "budget"])
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_clipping_counts_the_tied_gradient_once(tmp_path: Path, homes: str,
                                                schedule: str) -> None:
    batches = _batches()
    with _trainer(tmp_path, homes, schedule, _adamw, clip_grad_norm=0.05) as t:
        for b in batches:
            t.step(*b)
        _check_split(t)
        assert t.runtime is not None and t.runtime.grad_norm > 0.05  # clipping was active
        got = t.state_dict()
    _close(got, _reference(_adamw, batches, max_norm=0.05))


def test_save_load_resume_and_export(tmp_path: Path) -> None:
    """A run saved after one step and resumed equals an uninterrupted run, bitwise; the
    checkpoint and the export hold both tied keys with one value."""
    batches = _batches()
    for d in "abc":
        (tmp_path / d).mkdir()
    with _trainer(tmp_path / "a", "sharer-nvme", "harmony", _adamw) as t:
        for b in batches:
            t.step(*b)
        straight = t.state_dict()
    with _trainer(tmp_path / "b", "sharer-nvme", "harmony", _adamw) as t:
        t.step(*batches[0])
        t.save(tmp_path / "ckpt")
        t.step(*batches[1])  # a step to be undone by load()
    with _trainer(tmp_path / "c", "host", "harmony", _adamw) as t:
        t.load(tmp_path / "ckpt")
        for b in batches[1:]:
            t.step(*b)
        resumed = t.state_dict()
        out = t.export(tmp_path / "export")
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    assert torch.equal(exported[TIED[0]], exported[TIED[1]])
    assert torch.equal(exported[TIED[0]], straight[TIED[0]])


def test_optimizer_state_keys_do_not_depend_on_the_plan(tmp_path: Path) -> None:
    """One pack (the tie stays inside it) and three packs (the head computes with a copy) name
    the tied parameter's optimizer state alike, so a checkpoint of one resumes the other."""
    batch = _batches(1)[0]
    keys = []
    for homes in ("one-pack", "host"):
        if homes == "one-pack":
            t = harmony.Trainer(tied_transformer(), cross_entropy_tokens, optimizer=_adamw,
                                micro_batch_size=3)
        else:
            t = _trainer(tmp_path, homes, "harmony", _adamw)
        with t:
            t.step(*batch)
            assert t.plan is not None and len(t.plan.bounds) == (1 if homes == "one-pack" else 3)
            keys.append(sorted(t.optimizer_state()[0]))
            t.save(tmp_path / homes)
    assert keys[0] == keys[1]
    assert f"{TIED[0]}/exp_avg" in keys[0]
    with _trainer(tmp_path, "host", "harmony", _adamw) as t:
        t.load(tmp_path / "one-pack")
        t.step(*batch)  # builds the packs, then applies the loaded state
        assert t.runtime is not None
        owner = t.runtime.packs[0]
        state = owner.optimizer.state[owner.masters[0]]
        assert int(state["step"]) == 2, "the tied parameter's loaded state was not applied"


def test_close_reties_and_memory_is_given_back(tmp_path: Path) -> None:
    model = tied_transformer()
    t = harmony.Trainer(model, cross_entropy_tokens, optimizer=_adamw, micro_batch_size=3,
                        device_memory=BUDGET)
    used = []
    for b in _batches():
        t.step(*b)
        used.append(t.tiers[Loc.HOST].used)  # where this plan's gradients wait for updates
        assert t.runtime is not None and t.runtime.ties is not None
        assert not t.runtime.ties.held, "a gradient held for the owner was not merged"
    _check_split(t)
    assert model.head.out.weight is not model.embed.tok.weight  # a copy while training
    assert used[1] == used[2], "a held gradient was not given back"
    t.close()
    assert model.head.out.weight is model.embed.tok.weight


def test_schedule_updating_the_owner_too_early_is_refused() -> None:
    model = tied_transformer()
    layers = layers_of(model)
    ties = untie(model, layers, [(0, 1), (1, 5)])
    assert [(tie.owner, [s.pack for s in tie.sharers]) for tie in ties] == [(0, [1])]

    class _Pack:  # what TiedWeights reads of a pack
        def __init__(self, tensors: list[torch.Tensor]) -> None:
            self.layout = type("L", (), {"trainable": [type("E", (), {"tensor": x})()
                                                       for x in tensors]})()

    packs = [_Pack([ties[0].master]), _Pack([ties[0].sharers[0].copy])]
    tied = TiedWeights(ties, packs)  # type: ignore[arg-type]
    good = Schedule("harmony", 2, 1, (Task(Op.FWD, 0, 0), Task(Op.BWD, 1, 0), Task(Op.UPD, 1),
                                      Task(Op.BWD, 0, 0), Task(Op.UPD, 0)), recompute=True)
    tied.check(good)
    bad = Schedule("custom", 2, 1, (Task(Op.FWD, 0, 0), Task(Op.BWD, 1, 0), Task(Op.BWD, 0, 0),
                                    Task(Op.UPD, 0), Task(Op.BWD, 1, 0), Task(Op.UPD, 1)),
                   recompute=True)
    with pytest.raises(ValueError, match="tied parameter 'embed.tok.weight'.*pack 1"):
        tied.check(bad)


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_pack_holding_only_tied_copies_trains(schedule: str) -> None:
    """A pack whose only trainable parameter is a copy has nothing of its own to update: its
    gradient goes to the owner, which trains the one weight as plain PyTorch does."""
    def model() -> torch.nn.Sequential:
        torch.manual_seed(0)
        emb, out = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False)
        out.weight = emb.weight
        return torch.nn.Sequential(emb, out)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, 5, (4, 3), generator=g))
               for _ in range(3)]
    net = model()
    with harmony.Trainer(net, cross_entropy_tokens, optimizer=_adamw, micro_batch_size=2,
                         schedule=schedule) as t:
        t.planner.fixed = (((0, 1), (1, 2)), Placement.uniform(2, Loc.HOST))
        for b in batches:
            t.step(*b)
        got = t.state_dict()
    assert net[1].weight is net[0].weight  # close() re-ties the model
    ref = model()
    opt = _adamw(list(ref.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (cross_entropy_tokens(ref(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    want = {k: v.detach() for k, v in ref.state_dict().items()}
    assert torch.equal(got["0.weight"], got["1.weight"])
    assert not torch.equal(want["0.weight"], model()[0].weight)
    assert_weights_close(got, want, RTOL)


@pytest.mark.parametrize("homes", ["device", "host"])
def test_gradient_kept_for_the_owner_is_charged_to_its_tier(tmp_path: Path, homes: str) -> None:
    """In the harmony schedule the head's update runs before the embedding's: the head's
    gradient for the tied weight waits, charged to the tier where the head's update runs."""
    batches = _batches(2)
    with _trainer(tmp_path, homes, "harmony", _adamw) as t:
        t.step(*batches[0])
        rt = t.runtime
        assert rt is not None and rt.ties is not None
        ties, seen = rt.ties, []
        tied_bytes = tied_transformer().embed.tok.weight.numel() * 4
        original = ties.before_update

        def spy(p: int) -> None:
            loc = HOMES[homes][2]
            rt.tiers[loc].drain()  # (releases waiting for copies: not what is measured)
            before = rt.tiers[loc].used
            original(p)
            if p == 2:  # the head: its gradient for the tied weight is now held aside
                assert [loc_ for _, loc_ in ties.held.values()] == [loc]
                seen.append(rt.tiers[loc].used - before)
            if p == 0:
                assert not ties.held  # merged into the embedding's and given back
                seen.append(-1)

        ties.before_update = spy  # type: ignore[method-assign]
        t.step(*batches[1])
    assert seen == [tied_bytes, -1]


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_plan_counts_the_held_gradient(tmp_path: Path, schedule: str) -> None:
    """The planner knows the head keeps its gradient of the tied weight until the embedding's
    update, and that only the embedding's optimizer holds state for it: the predicted peaks
    cover what the tiers held, within a few percent."""
    with _trainer(tmp_path, "budget", schedule, _adamw) as t:
        t.step(*_batches(1)[0])
        for tier in t.tiers.values():
            tier.reset_peak()
        t.step(*_batches(2)[1])
        plan = t.plan
        assert plan is not None
        owner, sharer = 0, len(plan.bounds) - 1
        tied_bytes = tied_transformer().embed.tok.weight.numel() * 4
        assert plan.sizes.held == ((sharer, owner, tied_bytes),)
        for loc, tier in t.tiers.items():
            predicted = plan.predicted.peak.get(loc, 0)
            assert tier.peak <= predicted * 1.05 + 1024, (loc, tier.peak, predicted)
            assert tier.peak >= predicted * 0.9, (loc, tier.peak, predicted)


def test_a_frozen_weight_shared_by_packs_trains_saves_and_resumes(tmp_path: Path) -> None:
    """A frozen tensor used by layers of two packs (a peft model's frozen base embedding tied
    to its head; here one frozen Linear at two positions) gets a copy in the later pack, as a
    trainable one does (both packs bound the one tensor: the forward found it swapped out, or
    save() wrote its key twice). Training is bit for bit plain PyTorch (nothing to add up for
    a frozen tensor), and a checkpoint and an export hold it once and resume exactly."""
    def model() -> torch.nn.Sequential:
        torch.manual_seed(0)
        shared = torch.nn.Linear(16, 16)
        shared.requires_grad_(False)
        return torch.nn.Sequential(shared, torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                   torch.nn.Tanh(), shared, torch.nn.Linear(16, 4))

    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(3)]
    loss = torch.nn.functional.cross_entropy

    def adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=1e-2)

    ref = model()
    opt = adamw([p for p in ref.parameters() if p.requires_grad])
    for x, y in batches:
        for xm, ym in zip(x.split(4), y.split(4)):
            (loss(ref(xm), ym) * 0.5).backward()
        opt.step()
        opt.zero_grad()
    kw = {"optimizer": adamw, "micro_batch_size": 4, "device_memory": "6KiB"}
    with harmony.Trainer(model(), loss, **kw) as t:
        for x, y in batches[:2]:
            t.step(x, y)
        assert t.plan is not None
        packs = {i for i, (a, b) in enumerate(t.plan.bounds) for layer in (0, 4) if a <= layer < b}
        assert len(packs) == 2  # the shared layer's two uses sit in two packs
        t.save(tmp_path / "ckpt")
        t.step(*batches[2])
        want = t.state_dict()
    assert all(torch.equal(want[k], v) for k, v in ref.state_dict().items())
    with harmony.Trainer(model(), loss, **kw) as t:
        t.load(tmp_path / "ckpt")
        t.step(*batches[2])
        got = t.state_dict()
        exported = load_file(t.export(tmp_path / "out") / "model.safetensors")
    assert got.keys() == want.keys() == exported.keys()
    assert all(torch.equal(got[k], want[k]) and torch.equal(exported[k], want[k]) for k in want)
