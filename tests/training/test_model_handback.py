"""The user's model stays theirs: a failed first step leaves it as it was, close() gives it
the trained weights, and touching it while a trainer holds it says so."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import harmony
from schedules.task import Loc
from tests.fs import tmpfs
from tests.models import MODELS, reference_train, training_state_bytes

FACTORY, LOSS, DATA = MODELS["transformer"]


def _opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [DATA(6, g) for _ in range(n)]


def _weights_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _budgets(placement: str, model: nn.Module, nvme: Path) -> dict[str, Any]:
    state = training_state_bytes(model, 8)
    if placement == "device":
        return {}
    if placement == "host":
        return {"device_memory": state // 2}
    nvme.mkdir(exist_ok=True)
    return {"device_memory": state // 2, "host_memory": state // 2, "nvme_dir": str(nvme),
            "nvme_backend": "buffered"}


def _snapshot(model: nn.Module) -> tuple[list[nn.Parameter], dict[str, torch.Tensor]]:
    return list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snapshot: tuple[list[nn.Parameter], dict[str, torch.Tensor]]
          ) -> None:
    params, values = snapshot
    assert all(a is b for a, b in zip(params, model.parameters())), "Parameter objects changed"
    now = model.state_dict()
    assert now.keys() == values.keys()
    for k in values:
        assert torch.equal(now[k], values[k]), k


# -- close() gives the model back -------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("placement", ["device", "host", "nvme"])
def test_close_gives_the_model_its_trained_weights(tmp_path: Path, placement: str,
                                                   precision: str) -> None:
    model = FACTORY(0.0)
    params = list(model.parameters())
    batches = _batches()
    t = harmony.Trainer(model, LOSS, optimizer=_opt, micro_batch_size=2, precision=precision,
                        **_budgets(placement, model, tmp_path / "nvme"))
    for b in batches:
        t.step(*b)
    want = t.state_dict()
    t.close()
    assert all(a is b for a, b in zip(params, model.parameters()))
    got = model.state_dict()  # the model is the user's again: reading it works
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert got[k].device.type == "cpu"
    model.load_state_dict(want)  # what people do first to get their model back
    x, y = batches[0]
    assert torch.isfinite(LOSS(model(x), y))
    if placement == "nvme":
        assert os.listdir(tmp_path / "nvme") == []
    if precision == "fp32":  # and they are plain PyTorch's weights
        ref = reference_train(FACTORY(0.0), LOSS, _opt, batches, 2)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_release_model_closes_and_returns_the_model(tmp_path: Path) -> None:
    model = FACTORY(0.0)
    t = harmony.Trainer(model, LOSS, micro_batch_size=2,
                        **_budgets("host", model, tmp_path / "nvme"))
    t.step(*_batches(1)[0])
    want = t.state_dict()
    assert t.release_model() is model
    with pytest.raises(RuntimeError, match="closed"):
        t.step(*_batches(1)[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k])
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)  # not the empty tensors of before
    saved = torch.load(path)
    assert all(torch.equal(saved[k], want[k]) for k in want)


def test_a_model_given_as_a_list_of_layers_is_given_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)]
    t = harmony.Trainer(layers, nn.functional.cross_entropy, micro_batch_size=2,
                        device_memory=6000)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
    t.step(x, y)
    want = t.state_dict()
    with pytest.raises(RuntimeError, match="held by a harmony.Trainer"):
        layers[0](x)
    t.close()
    assert torch.equal(layers[0].weight, want["0.weight"])
    assert torch.equal(layers[2].bias, want["2.bias"])


# -- while a trainer holds the model ------------------------------------------------------------

def test_touching_a_held_model_says_who_holds_it(tmp_path: Path) -> None:
    model = FACTORY(0.0)
    x, y = _batches(1)[0]
    with harmony.Trainer(model, LOSS, micro_batch_size=2,
                         **_budgets("host", model, tmp_path)) as t:
        t.step(x, y)
        for touch in (lambda: model(x), lambda: model.blocks[0](torch.zeros(2, 8, 32)),
                      lambda: model.state_dict(),
                      lambda: model.load_state_dict(t.state_dict())):
            with pytest.raises(harmony.ModelHeldError, match=r"held by a harmony\.Trainer.*"
                                                   r"trainer\.state_dict\(\).*release_model"):
                touch()
        t.step(x, y)  # the trainer itself goes on
    model(x)  # closed: the model is the user's again


def test_a_second_trainer_on_a_held_model_is_refused(tmp_path: Path) -> None:
    model = FACTORY(0.0)
    x, y = _batches(1)[0]
    first = harmony.Trainer(model, LOSS, micro_batch_size=2,
                            **_budgets("host", model, tmp_path))
    first.step(x, y)
    with pytest.raises(ValueError, match=r"held by another harmony\.Trainer.*close\(\)"):
        harmony.Trainer(model, LOSS, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"held by another harmony\.Trainer"):
        harmony.Trainer([model.embed, model.blocks[0]], LOSS, micro_batch_size=2)
    first.step(x, y)  # the first one is unharmed
    want = first.state_dict()
    first.close()
    with harmony.Trainer(model, LOSS, micro_batch_size=2) as second:  # now it may
        got = second.state_dict()
        second.step(x, y)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(12)),
                         nn.Linear(64, 5))


def test_weights_larger_than_the_host_budget_are_not_given_back_silently(
        tmp_path: Path) -> None:
    model = _deep_mlp()
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    weights = _weights_bytes(model)
    state = training_state_bytes(model, 8)
    t = harmony.Trainer(model, nn.functional.cross_entropy, optimizer=_opt, micro_batch_size=2,
                        device_memory=state // 4, host_memory=int(weights * 0.7),
                        nvme_dir=str(nvme), nvme_backend="buffered")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 64, generator=g), torch.randint(0, 5, (4,), generator=g)
    t.step(x, y)
    with pytest.raises(RuntimeError, match=r"host_memory.*export\(.*save\("):
        t.release_model()
    t.step(x, y)  # refused before closing: the trainer is still whole
    t.export(tmp_path / "out")
    with pytest.warns(UserWarning, match="not given back"):
        t.close()
    with pytest.raises(RuntimeError, match=r"host_memory.*not given back"):
        model(x)
    with pytest.raises(ValueError, match=r"no weights.*not given back"):
        harmony.Trainer(model, nn.functional.cross_entropy)


def test_the_warning_that_weights_are_not_given_back_points_at_the_users_code(
        tmp_path: Path) -> None:
    """Whether closed by close() or by leaving a ``with`` block, the warning names the user's
    line, not harmony's (where a warnings filter or a reader would look)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 64, generator=g), torch.randint(0, 5, (4,), generator=g)
    for closing in ("close", "with"):
        model = _deep_mlp()
        nvme = tmp_path / closing
        nvme.mkdir()
        t = harmony.Trainer(model, nn.functional.cross_entropy, optimizer=_opt,
                            micro_batch_size=2, device_memory=training_state_bytes(model, 8) // 4,
                            host_memory=int(_weights_bytes(model) * 0.7), nvme_dir=str(nvme),
                            nvme_backend="buffered")
        with pytest.warns(UserWarning, match="not given back") as caught:
            if closing == "close":
                t.step(x, y)
                t.close()
            else:
                with t:
                    t.step(x, y)
        assert [w.filename for w in caught] == [__file__], closing


def test_a_trainer_closed_after_a_step_failed_part_way_does_not_give_back_mixed_weights(
        tmp_path: Path) -> None:
    calls = [0]

    class Failing(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
            return super().step(closure)

    model = FACTORY(0.0)
    t = harmony.Trainer(model, LOSS, optimizer=lambda ps: Failing(ps, lr=0.01),
                        micro_batch_size=2, **_budgets("host", model, tmp_path))
    with pytest.raises(KeyboardInterrupt):
        t.step(*_batches(1)[0])
    with pytest.warns(UserWarning, match="not given back"):
        t.close()
    with pytest.raises(RuntimeError, match=r"failed.*load\(\)"):
        model.state_dict()


# -- building the packs is all or nothing -------------------------------------------------------

def _failing_factory(fail_on: set[int]) -> Any:
    """Fails on the packs counted in ``fail_on`` (1: the first pack built)."""
    calls = [0]

    def factory(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        if len(ps) == 1:  # harmony's probe of the optimizer's state size on a stand-in
            return _opt(ps)
        calls[0] += 1
        if calls[0] in fail_on:
            raise RuntimeError(f"optimizer factory failed (call {calls[0]})")
        return _opt(ps)

    return factory


@pytest.mark.parametrize("placement", ["device", "host", "nvme"])
@pytest.mark.parametrize("fail_on", [{1, 2, 3, 4, 5, 6, 7, 8}, {2}], ids=["always", "once"])
def test_a_failing_optimizer_factory_leaves_the_model_as_it_was(
        tmp_path: Path, placement: str, fail_on: set[int]) -> None:
    model = FACTORY(0.0)
    before = _snapshot(model)
    batches = _batches()
    if placement == "device" and fail_on == {2}:
        fail_on = {1}  # (everything on the device is one pack)
    t = harmony.Trainer(model, LOSS, optimizer=_failing_factory(fail_on), micro_batch_size=2,
                        **_budgets(placement, model, tmp_path / "nvme"))
    with pytest.raises(RuntimeError, match="optimizer factory failed"):
        t.step(*batches[0])
    assert t.step_count == 0
    assert all(tier.used == 0 for tier in t.tiers.values()), \
        {loc: tier.used for loc, tier in t.tiers.items()}
    if t.store is not None:
        assert len(t.store) == 0
    assert all(torch.equal(v, before[1][k]) for k, v in t.state_dict().items())
    if len(fail_on) == 1:  # a retry builds the packs and trains as plain PyTorch does
        for b in batches:
            t.step(*b)
        got = t.state_dict()
        ref = reference_train(FACTORY(0.0), LOSS, _opt, batches, 2)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        t.close()
        return
    t.close()
    _same(model, before)


def test_the_disk_filling_while_packs_are_built_leaves_the_model_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    # The plan's free-space check passes (another process fills the disk just after it), so
    # the disk fills while the packs are being written.
    monkeypatch.setattr("harmony.training.steps.refuse_nvme_space", lambda *a, **k: None)
    model = FACTORY(0.0)
    before = _snapshot(model)
    state = training_state_bytes(model, 8)
    with tmpfs(tmp_path / "small", "size=96k") as small:
        t = harmony.Trainer(model, LOSS, optimizer=_opt, micro_batch_size=2,
                            device_memory=state // 2, host_memory=state // 4,
                            nvme_dir=str(small), nvme_backend="buffered")
        with pytest.raises(OSError, match="No space|ENOSPC|free space"):
            t.step(*_batches(1)[0])
        assert t.step_count == 0
        assert all(tier.used == 0 for tier in t.tiers.values())
        t.close()
        assert os.listdir(small) == []
    _same(model, before)


def test_an_optimizer_instance_instead_of_a_factory_is_refused_up_front() -> None:
    model = FACTORY(0.0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"optimizer=AdamW\(.*\) is an optimizer, not a "
                                         r"factory.*optimizer=lambda params: "
                                         r"torch\.optim\.AdamW\(params, lr="):
        harmony.Trainer(model, LOSS, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=r"optimizer='adam' is not callable"):
        harmony.Trainer(model, LOSS, optimizer="adam")  # type: ignore[arg-type]
    _same(model, before)
    with harmony.Trainer(model, LOSS, micro_batch_size=2) as t:  # nothing was held
        t.step(*_batches(1)[0])


@pytest.mark.parametrize("kind", ["ignores", "other"])
def test_an_optimizer_over_other_parameters_is_refused(tmp_path: Path, kind: str) -> None:
    model = FACTORY(0.0)
    before = _snapshot(model)
    other = nn.Linear(3, 3)
    bad = (lambda ps: torch.optim.SGD(model.parameters(), lr=0.1)) if kind == "ignores" \
        else (lambda ps: torch.optim.SGD(other.parameters(), lr=0.1))
    with harmony.Trainer(model, LOSS, optimizer=bad, micro_batch_size=2,
                         **_budgets("host", model, tmp_path)) as t:
        with pytest.raises(ValueError, match=r"holds other parameters than.*"
                                             r"optimizer=lambda params: torch\.optim\."):
            t.step(*_batches(1)[0])
        assert t.step_count == 0
    _same(model, before)


# -- the learning-rate scheduler is checked before the first update ------------------------------

@pytest.mark.parametrize(("factory", "match"), [
    (lambda opt: None, r"lr_scheduler.*returned None.*step\(\)"),
    (lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
     r"ReduceLROnPlateau.*metric"),
    (lambda opt: "cosine", r"lr_scheduler.*returned str"),
])
def test_a_bad_lr_scheduler_is_refused_before_any_update(tmp_path: Path, factory: Any,
                                                         match: str) -> None:
    model = FACTORY(0.0)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (ReduceLROnPlateau's own deprecation notes)
        with harmony.Trainer(model, LOSS, optimizer=_opt, lr_scheduler=factory,
                             micro_batch_size=2, **_budgets("host", model, tmp_path)) as t:
            with pytest.raises(ValueError, match=match):
                t.step(*_batches(1)[0])
            assert t.step_count == 0
            assert all(torch.equal(v, before[1][k]) for k, v in t.state_dict().items())
    _same(model, before)


def test_tiers_hold_nothing_after_a_refused_build() -> None:
    """(The accounting a retry starts from.)"""
    model = FACTORY(0.0)
    t = harmony.Trainer(model, LOSS, optimizer=_failing_factory({1}), micro_batch_size=2,
                        device_memory=training_state_bytes(model, 8) // 2)
    with pytest.raises(RuntimeError):
        t.step(*_batches(1)[0])
    assert t.tiers[Loc.DEVICE].used == 0 and t.tiers[Loc.HOST].used == 0
    t.step(*_batches(1)[0])
    t.close()


def test_a_layer_that_cannot_be_restored_is_named(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Restoring the model after a failed build reads the packs' homes back; should that fail
    too (say, the NVMe files are unreadable), the error says which layers lost their values
    rather than hiding it."""
    from harmony.runtime.pack import Pack

    real = Pack.give_back

    def unreadable(self: Pack, device_of: Any) -> None:
        if self.index == 0:
            raise OSError(5, "Input/output error")
        real(self, device_of)

    monkeypatch.setattr(Pack, "give_back", unreadable)
    model = FACTORY(0.0)
    t = harmony.Trainer(model, LOSS, optimizer=_failing_factory({2}), micro_batch_size=2,
                        **_budgets("host", model, tmp_path))
    with pytest.raises(RuntimeError, match="optimizer factory failed") as err:
        t.step(*_batches(1)[0])
    assert any("pack 0" in note and "lost" in note for note in err.value.__notes__)
