"""Re-planning onto new packs when a step's shapes no longer fit the packs built for the
first ones: weights, optimizer state and scheduler state move, and training stays exact."""

from __future__ import annotations

import copy
import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import harmony
import harmony.training.state_io
from harmony.planning import device_memory as dm
from harmony.training.config import TrainerConfig
from harmony.training.optimizer_state import OptimizerState
from harmony.training.planner import TrainerPlanner
from harmony.training.state_io import StateIO
from harmony.training.steps import Steps
from harmony.training.trainer import Trainer
from schedules.task import Loc
from swap.tier import Tier
from tests.models import (
    TinyTransformer,
    assert_weights_close,
    cross_entropy_tokens,
    reference_train,
    training_state_bytes,
)
from tests.planning.test_device_memory import MIB, FakeAllocator
from tests.timing import fix_timing


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    xs = [torch.randint(0, 11, (n, t), generator=g) for n, t in ((4, 4), (4, 4), (4, 16), (4, 8))]
    return [(x, x.roll(-1, 1)) for x in xs]


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    net = TinyTransformer(length=16)
    opt = _adamw(list(net.parameters()))
    sched = _sched(opt)
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (cross_entropy_tokens(net(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture
def fixed_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans from sizes alone: which packs the planner builds must not follow the load."""
    fix_timing(monkeypatch.setattr)


@pytest.mark.parametrize("chunk", ["auto", "12KiB"])  # (NVMe packs' files in chunks)
def test_longer_sequences_move_the_state_to_new_packs(tmp_path: Path, monkeypatch,
                                                      chunk: str, fixed_timing: None) -> None:
    rehomed: list[tuple[str, ...]] = []
    original = Trainer._rehome

    def spy(self: Trainer, *args: object) -> object:
        assert self.plan is not None
        rehomed.append(tuple(loc.value for loc in self.plan.placement.w))
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "_rehome", spy)
    batches = _batches()
    model = TinyTransformer(length=16)
    state = training_state_bytes(model, 8)
    # Short sequences first: the plan keeps part of the state on the device and the host;
    # sequences four times longer then need the room for activations.
    with harmony.Trainer(model, cross_entropy_tokens, optimizer=_adamw, micro_batch_size=2,
                         device_memory=state // 3, host_memory=state // 2, nvme_dir=tmp_path,
                         lr_scheduler=_sched, update_chunk=chunk) as t:
        for x, y in batches:
            t.step(x, y)
            assert t.stats.peak_bytes["device"] <= state // 3
            assert t.stats.peak_bytes["host"] <= state // 2
        assert rehomed, "the longer sequences were expected to need new packs"
        assert {s.get_last_lr()[0] for s in t.lr_schedulers} == {1e-2 / 5}
        got = t.state_dict()
        assert t.store is not None
        nvme_packs = [p for p, loc in enumerate(t.plan.placement.w) if loc.value == "nvme"]
        assert nvme_packs
        # the old packs' files are gone: one weight and one state file per chunk of each
        # NVMe pack now
        assert t.runtime is not None
        assert sorted(t.store.keys()) == sorted(
            t.runtime.packs[p].key(k, c) for p in nvme_packs
            for c in range(len(t.runtime.packs[p].chunks)) for k in ("W", "K"))
        chunks = max(len(t.runtime.packs[p].chunks) for p in nvme_packs)
        assert (chunks > 1) == (chunk != "auto"), chunks
    want = _reference(batches)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_tied_weights_survive_new_packs(monkeypatch) -> None:
    """Re-homing re-ties the model and splits the tied weight afresh for the new packs."""
    rehomed: list[int] = []
    original = Trainer._rehome

    def spy(self: Trainer, *args: object) -> object:
        rehomed.append(self.step_count)
        return original(self, *args)  # type: ignore[arg-type]

    def tied() -> TinyTransformer:
        model = TinyTransformer(length=16)
        model.head.out.weight = model.embed.tok.weight
        return model

    def adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=1e-2, eps=1e-3)  # (eps: see tests/model/test_tied.py)

    monkeypatch.setattr(Trainer, "_rehome", spy)
    batches = _batches()
    model = tied()
    state = training_state_bytes(model, 8)
    with harmony.Trainer(model, cross_entropy_tokens, optimizer=adamw, micro_batch_size=2,
                         device_memory=state // 2) as t:
        for x, y in batches:
            t.step(x, y)
        assert rehomed
        got = t.state_dict()
    assert model.head.out.weight is model.embed.tok.weight  # close() re-tied the model
    ref = tied()
    opt = adamw(list(ref.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (cross_entropy_tokens(ref(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(got["embed.tok.weight"], got["head.out.weight"])
    assert_weights_close(got, {k: v.detach() for k, v in ref.state_dict().items()}, 1e-5)


def test_shapes_that_fit_no_plan_leave_the_trainer_as_it_was() -> None:
    """A batch no plan can hold is refused before anything changes; the trainer then goes on
    with other batch sizes of the first shapes (planned from the first shapes' profile)."""
    def least(seq: int) -> int:
        t = harmony.Trainer(TinyTransformer(length=16), cross_entropy_tokens, optimizer=_adamw,
                            micro_batch_size=2, device_memory=1 << 30)
        t.device_memory = 1  # past the construction-time check
        x = torch.zeros(4, seq, dtype=torch.long)
        with t, pytest.raises(harmony.InfeasiblePlan) as err:
            t.step(x, x)
        return err.value.device_needed

    budget = (least(4) + least(16)) // 2
    assert least(4) <= budget < least(16)
    g = torch.Generator().manual_seed(6)
    fits = [torch.randint(0, 11, (n, 4), generator=g) for n in (4, 6)]
    too_long = torch.randint(0, 11, (4, 16), generator=g)
    with harmony.Trainer(TinyTransformer(length=16), cross_entropy_tokens, optimizer=_adamw,
                         micro_batch_size=2, device_memory=budget) as t:
        t.step(fits[0], fits[0].roll(-1, 1))
        with pytest.raises(harmony.InfeasiblePlan):
            t.step(too_long, too_long.roll(-1, 1))
        t.step(fits[1], fits[1].roll(-1, 1))  # a new batch size of the first shapes
        assert t.step_count == 2
        got = t.state_dict()
    net = TinyTransformer(length=16)
    opt = _adamw(list(net.parameters()))
    for x in fits:
        y = x.roll(-1, 1)
        for xm, ym in zip(x.split(2), y.split(2)):
            (cross_entropy_tokens(net(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    for k, v in net.state_dict().items():
        assert torch.equal(got[k], v), k


def test_budgets_set_between_steps_plan_the_next_step_afresh(fixed_timing: None) -> None:
    """``trainer.device_memory = "256KiB"`` (parsed as at construction) makes the next step,
    of the same shapes, plan afresh under the new budgets and move the state to new packs,
    the tiers holding the new budgets (a host budget raised beyond the one the host tier was
    built with no longer fails mid-step); training stays exact, and close() gives the model
    back. An unparseable size is refused naming it, the budget left as it was."""
    batches = _batches()
    batches = [batches[0], batches[1], batches[0], batches[1]]  # (one shape: no re-plan for it)
    model = TinyTransformer(length=16)
    t = harmony.Trainer(model, cross_entropy_tokens, optimizer=_adamw, lr_scheduler=_sched,
                        micro_batch_size=2, device_memory=1 << 30, host_memory="64KiB")
    t.step(*batches[0])
    assert t.plan is not None and len(t.plan.bounds) == 1  # all on the device
    for bad in ("lots", "-1GiB", True):
        with pytest.raises(ValueError, match="device_memory="):
            t.device_memory = bad
    assert t.device_memory == 1 << 30
    t.device_memory, t.host_memory = "256KiB", "16MiB"
    assert (t.device_memory, t.host_memory) == (256 << 10, 16 << 20)
    t.step(*batches[1])  # plans afresh: packs swap through the host
    assert len(t.plan.bounds) > 1
    assert t.tiers[Loc.DEVICE].capacity == 256 << 10 and t.tiers[Loc.HOST].capacity == 16 << 20
    t.stats.reset()  # (the peaks restart: the packs of the first plan were over the budget)
    for x, y in batches[2:]:
        t.step(x, y)
    assert 0 < t.stats.peak_bytes["device"] <= 256 << 10
    assert t.stats.peak_bytes["host"] > 64 << 10  # beyond the host budget it was built with
    t.close()
    assert_weights_close(model.state_dict(), _reference(batches), 1e-6)


def test_a_budget_raised_after_an_infeasible_first_step_is_the_tiers_too(
        tmp_path: Path) -> None:
    """The first step refused (the host budget too small for any plan), the user raises
    ``trainer.host_memory`` and steps again: the packs are built in a host tier of the new
    budget (it kept the old one and failed part-way through the step), bit for bit plain
    PyTorch."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(64, 64), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 4))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 64, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(2)]
    loss = torch.nn.functional.cross_entropy
    t = harmony.Trainer(model, loss, optimizer=_adamw, micro_batch_size=4,
                        device_memory="40KiB", host_memory="60KiB", nvme_dir=tmp_path)
    with pytest.raises(harmony.InfeasiblePlan, match="host_memory="):
        t.step(*batches[0])
    t.host_memory = "256KiB"
    for x, y in batches:
        t.step(x, y)
    assert t.plan is not None and Loc.NVME not in t.plan.placement.w  # (it fits the host now)
    got = t.state_dict()
    t.close()
    want = reference_train(ref, loss, _adamw, batches, 4)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_pipeline_stages_planned_once_refuse_a_new_budget() -> None:
    """Pipeline stages are planned once: a new budget after the first step is refused naming
    it (before it, and the same value, pass); a bad size is refused anywhere."""
    stage = SimpleNamespace(pipeline=object(), device=torch.device("cpu"))  # a pipeline rank's
    planner = TrainerPlanner(harmony.TrainerConfig(), stage, cross_entropy_tokens,  # type: ignore[arg-type]
                             given=None, k_ratio=2.0, tied=[], device_memory=1 << 20,
                             host_memory=None)
    planner.set_budget("device_memory", "2MiB", planned=False)
    planner.set_budget("device_memory", 2 << 20, planned=True)
    with pytest.raises(ValueError, match=r"host_memory='1GiB' refused: with parallel='pipeline'"):
        planner.set_budget("host_memory", "1GiB", planned=True)
    with pytest.raises(ValueError, match="device_memory="):
        planner.set_budget("device_memory", "lots", planned=False)
    assert (planner.device_memory, planner.host_memory) == (2 << 20, None)


def test_a_device_budget_set_between_steps_is_checked_against_the_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As at construction: a budget the GPU cannot hold once the trainer's packs are released
    is refused with the numbers, and the budget stays as it was; one it can hold is taken."""
    a = FakeAllocator(monkeypatch)
    a.reserved = a.allocated = 500 * MIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1 << 30, 80 << 30))
    tier = Tier("device", torch.device("cpu"), capacity=400 * MIB)
    tier.charge(400 * MIB)  # what the packs hold now, released at the re-home
    holdings = SimpleNamespace(pipeline=None, device=torch.device("cuda", 0),
                               tiers={Loc.DEVICE: tier})
    planner = TrainerPlanner(TrainerConfig(), holdings, lambda o, y: o.sum(),  # type: ignore[arg-type]
                             given=None, k_ratio=2.0, tied=[], device_memory=400 * MIB,
                             host_memory=None)
    room = (1 << 30) + 400 * MIB  # free, and the packs' bytes
    with pytest.raises(ValueError, match=r"device_memory=1.39GiB does not fit on cuda:0"):
        planner.set_budget("device_memory", room, planned=True)
    assert planner.device_memory == 400 * MIB
    planner.set_budget("device_memory", room - dm.WORKSPACE_HEADROOM, planned=True)
    assert planner.device_memory == room - dm.WORKSPACE_HEADROOM
    planner.set_budget("host_memory", 1 << 40, planned=True)  # (not the GPU's)
    assert planner.host_memory == 1 << 40


def _tied() -> TinyTransformer:
    model = TinyTransformer(length=16)
    model.head.out.weight = model.embed.tok.weight
    return model


def _rehomed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                 through_disk: bool) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Train on the batches (a new budget after the first one re-homes, and the longer ones
    may) with an NVMe directory; the hand-over goes through files there, or
    (``through_disk`` False) through memory."""
    spilled: list[Path] = []
    spill = Steps._spill

    def recorded(self: Steps, built: object) -> object:
        out = spill(self, built)  # type: ignore[arg-type]
        assert self._spilled is not None
        spilled.append(self._spilled)
        return out

    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("the re-home read the whole state into memory")

    model = _tied() if case == "tied" else TinyTransformer(length=16)
    state = training_state_bytes(model, 8)
    nvme = tmp_path / str(through_disk)
    nvme.mkdir()
    t = harmony.Trainer(model, cross_entropy_tokens, optimizer=_adamw, micro_batch_size=2,
                        device_memory=state // 3, host_memory=state // 2, nvme_dir=nvme,
                        lr_scheduler=_sched, precision="bf16" if case == "bf16" else "fp32")
    with t:
        with monkeypatch.context() as m:
            if through_disk:
                m.setattr(Steps, "_spill", recorded)
                m.setattr(StateIO, "state_dict", whole)
                m.setattr(OptimizerState, "read", whole)
            else:
                m.setattr(Steps, "_spill", lambda self, built: None)
            for i, (x, y) in enumerate(_batches()):
                if i == 1:  # a new budget re-homes too
                    t.device_memory = state // 2
                t.step(x, y)
        return t.state_dict(), spilled


@pytest.mark.parametrize("case", ["adamw", "tied", "bf16"])
def test_a_rehome_through_the_nvme_directory_equals_one_through_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_timing: None, case: str) -> None:
    """With an NVMe directory the re-home writes the state there and the new packs read it
    back one tensor at a time (the whole state is never read into memory): the training is
    the same as with the hand-over through memory, and the files go once the packs are
    built."""
    disk, spilled = _rehomed_run(tmp_path, monkeypatch, case, through_disk=True)
    memory, _ = _rehomed_run(tmp_path, monkeypatch, case, through_disk=False)
    assert spilled, "the new budget was expected to need new packs"
    assert not any(p.exists() for p in spilled)
    assert disk.keys() == memory.keys()
    for k in disk:
        assert torch.equal(disk[k], memory[k]), k


def test_a_disk_too_full_for_the_rehome_goes_through_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_timing: None,
        caplog: pytest.LogCaptureFixture) -> None:
    def full(path: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, f"writing {path} failed (No space left on device)")

    monkeypatch.setattr(harmony.training.state_io, "write_safetensors", full)
    model = TinyTransformer(length=16)
    state = training_state_bytes(model, 8)
    batches = _batches()
    with harmony.Trainer(model, cross_entropy_tokens, optimizer=_adamw, micro_batch_size=2,
                         device_memory=state // 3, host_memory=state // 2, nvme_dir=tmp_path,
                         lr_scheduler=_sched) as t:
        for x, y in batches:
            t.step(x, y)
        got = t.state_dict()
        assert t.store is not None
        assert not list(t.store.directory.glob("rehome-*"))
    assert "the re-home goes through memory" in caplog.text
    want = _reference(batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _second_build_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second build of packs (the first re-home's) raises; the others build."""
    from harmony.training.built import Built

    build = Built.build
    calls: list[int] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: the new packs' build failed")
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Built, "build", staticmethod(flaky))


def _nvme_trainer(model: torch.nn.Module, nvme: Path) -> tuple[harmony.Trainer, int]:
    """A trainer under budgets of a third (device) and a half (host) of the model's
    training state, with NVMe; and that state's bytes."""
    state = training_state_bytes(model, 8)
    return harmony.Trainer(model, cross_entropy_tokens, optimizer=_adamw, micro_batch_size=2,
                           device_memory=state // 3, host_memory=state // 2, nvme_dir=nvme,
                           lr_scheduler=_sched), state


def test_a_rehome_whose_build_fails_tries_again_from_its_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_timing: None) -> None:
    """The new packs' build fails once (after the old packs are gone): the state stays in
    the re-home's files, the step raises, and the next step builds from them, exactly."""
    _second_build_fails(monkeypatch)
    batches = _batches()
    t, state = _nvme_trainer(TinyTransformer(length=16), tmp_path)
    with t:
        t.step(*batches[0])
        t.device_memory = state // 2
        with pytest.raises(RuntimeError, match="injected"):
            t.step(*batches[1])
        assert t.store is not None and len(list(t.store.directory.glob("rehome-*"))) == 1
        for x, y in batches[1:]:
            t.step(x, y)
        assert not list(t.store.directory.glob("rehome-*"))
        got = t.state_dict()
    want = _reference(batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_closing_after_a_failed_rehome_gives_the_model_its_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_timing: None) -> None:
    """The re-home's build fails and the trainer is closed: the model's tensors (placeholders
    while the new packs were to read the files) take the trained values back from the
    files before the NVMe directory goes."""
    _second_build_fails(monkeypatch)
    batches = _batches()
    model = TinyTransformer(length=16)
    t, state = _nvme_trainer(model, tmp_path)
    with t:
        t.step(*batches[0])
        t.device_memory = state // 2
        with pytest.raises(RuntimeError, match="injected"):
            t.step(*batches[1])
    want = _reference(batches[:1])
    for k, v in model.state_dict().items():
        assert v.stride() == want[k].stride() and torch.equal(v, want[k]), k


def test_a_load_after_a_failed_rehome_takes_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_timing: None) -> None:
    """The re-home's build fails; load() then replaces the state it left in its files: the
    next build reads the checkpoint's, and training goes on from it exactly."""
    _second_build_fails(monkeypatch)
    batches = _batches()
    (tmp_path / "nvme").mkdir()
    t, state = _nvme_trainer(TinyTransformer(length=16), tmp_path / "nvme")
    with t:
        t.step(*batches[0])
        t.save(tmp_path / "ckpt")
        t.step(*batches[1])  # (trained on, then rewound by the load)
        t.device_memory = state // 2
        with pytest.raises(RuntimeError, match="injected"):
            t.step(*batches[2])
        t.load(tmp_path / "ckpt")
        for x, y in batches[1:]:
            t.step(x, y)
        got = t.state_dict()
    want = _reference(batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k
