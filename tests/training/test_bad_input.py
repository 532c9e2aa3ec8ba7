"""User mistakes give a clear error naming the value, before training, and lose nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import harmony
from tests.models import MODELS, mlp

LOSS = nn.functional.cross_entropy


def _xy(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return MODELS["mlp"][2](n, g)


def test_budget_below_largest_layer_names_layer_and_bytes() -> None:
    with pytest.raises(ValueError, match=r"layer 3 \('3'\).*73\.00KiB.*device_memory>="):
        harmony.Trainer(mlp(), LOSS, device_memory="40KiB")


@pytest.mark.parametrize("value", ["8 gigs", "lots", "-1GiB", -5, float("nan"), True, [1]])
def test_unparseable_or_negative_budget(value: object) -> None:
    with pytest.raises(ValueError, match="device_memory="):
        harmony.Trainer(mlp(), LOSS, device_memory=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text,expected", [("64MiB", 64 << 20), ("1.5 GiB", 3 << 29),
                                           ("800MB", 800_000_000), ("12", 12), (4096, 4096)])
def test_budget_strings(text: object, expected: int) -> None:
    assert harmony.parse_bytes(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("mbs", [0, -1, 1.5, True, "4"])
def test_micro_batch_size(mbs: object) -> None:
    with pytest.raises(ValueError, match="micro_batch_size="):
        harmony.Trainer(mlp(), LOSS, micro_batch_size=mbs)  # type: ignore[arg-type]


def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"schedule='layerwise'.*harmony.*per-microbatch"):
        harmony.Trainer(mlp(), LOSS, schedule="layerwise")


def test_empty_and_undecomposable_models() -> None:
    with pytest.raises(ValueError, match="no layers"):
        harmony.Trainer(nn.Sequential(), LOSS)
    with pytest.raises(ValueError, match="harmony_chain"):
        harmony.Trainer(nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1,
                                       num_decoder_layers=1, dim_feedforward=8), LOSS)
    with pytest.raises(ValueError, match="nn.Module"):
        harmony.Trainer([nn.Linear(2, 2), "relu"], LOSS)  # type: ignore[list-item]


def test_buffers_shared_across_layers_refused() -> None:
    """Tied parameters are supported (tests/model/test_tied.py); a shared buffer is not."""
    a, b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    b.running_mean = a.running_mean
    with pytest.raises(ValueError, match="buffer 'running_mean' of layer 1 .* shared with layer 0"):
        harmony.Trainer(nn.Sequential(a, b), LOSS)


def test_batch_size_mismatch_and_empty_batch() -> None:
    with harmony.Trainer(mlp(), LOSS, micro_batch_size=2) as t:
        x, y = _xy()
        with pytest.raises(ValueError, match="batch size 6 but targets has 5"):
            t.step(x, y[:5])
        with pytest.raises(ValueError, match="empty"):
            t.step(x[:0], y[:0])
        assert t.step_count == 0


def test_cuda_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        harmony.Trainer(mlp(), LOSS, device="cuda")


def test_infeasible_plan_refused_before_training_and_loses_nothing() -> None:
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    t = harmony.Trainer(model, LOSS, micro_batch_size=64, device_memory="80KiB")
    x, y = _xy(256)
    with t, pytest.raises(harmony.InfeasiblePlan, match="micro_batch_size=64") as err:
        t.step(x, y)
    assert err.value.device_needed > 80 * 1024
    for k, v in t.state_dict().items():
        assert torch.equal(v, initial[k])


def test_bad_loss_is_reported_and_state_survives() -> None:
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # the first call returns per-sample losses, a user mistake
        return out.sum(dim=1) if len(calls) == 1 else LOSS(out, y)

    with harmony.Trainer(model, loss_fn, micro_batch_size=2, device_memory="200KiB") as t:
        with pytest.raises(ValueError, match="scalar"):
            t.step(*_xy())
        assert t.step_count == 0
        for k, v in t.state_dict().items():
            assert torch.equal(v, initial[k])
        assert t.step(*_xy()) > 0  # the trainer is still usable after the failed step
        assert t.step_count == 1


def test_layer_returning_a_non_tensor() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": x}

    with harmony.Trainer(nn.Sequential(nn.Linear(16, 4), Bad(), nn.Linear(4, 2)), LOSS) as t:
        with pytest.raises(TypeError, match="layer '1'.*dict"):
            t.step(*_xy())


def test_closed_trainer() -> None:
    t = harmony.Trainer(mlp(), LOSS)
    t.close()
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.step(*_xy())


@pytest.mark.parametrize("stepped", [False, True])
def test_a_closed_trainer_refuses_to_write_its_freed_state(tmp_path: Path,
                                                           stepped: bool) -> None:
    """After close() the packs' buffers are freed: state_dict() and export() read the weights
    from the model given back; optimizer_state(), save(), load() and step() are refused with
    a message pointing to the model, and write nothing."""
    model = mlp()
    t = harmony.Trainer(model, LOSS, micro_batch_size=2, device_memory="200KiB")
    if stepped:
        t.step(*_xy())
    t.save(tmp_path / "ckpt")
    t.close()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    got = t.state_dict()
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in got)
    exported = load_file(t.export(tmp_path / "out") / "model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    calls = {"optimizer_state()": t.optimizer_state,
             "save()": lambda: t.save(tmp_path / "again"),
             "load()": lambda: t.load(tmp_path / "ckpt"),
             "step()": lambda: t.record_step(*_xy(), tmp_path / "step.json")}
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match=re.escape(what) + r" refused: this Trainer is "
                           r"closed.*model\.state_dict\(\)"):
            call()
    assert not (tmp_path / "again").exists() and not (tmp_path / "step.json").exists()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch", "resident"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_loss_changes_nothing(schedule: str, policy: str) -> None:
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    budget = None if schedule == "resident" else "200KiB"
    with harmony.Trainer(model, LOSS, micro_batch_size=2, device_memory=budget,
                         schedule=schedule, nonfinite=policy) as t:
        x, y = _xy()
        x[3, 0] = float("nan")  # one sample of the second micro-batch
        if policy == "raise":
            with pytest.raises(harmony.NonFiniteLoss, match="nan"):
                t.step(x, y)
        else:
            assert t.step(x, y) != t.step(x, y)  # NaN, twice
            assert t.stats.skipped_steps == 2
        assert t.step_count == 0
        for k, v in t.state_dict().items():
            assert torch.equal(v, initial[k])
        x[3, 0] = 0.0
        assert t.step(x, y) > 0 and t.step_count == 1


def test_inputs_on_the_wrong_device() -> None:
    with harmony.Trainer(mlp(), LOSS, micro_batch_size=2) as t:
        x, y = _xy()
        with pytest.raises(ValueError, match="inputs are on meta"):
            t.step(x.to("meta"), y)
        with pytest.raises(ValueError, match="targets are on meta"):
            t.step(x, y.to("meta"))
        assert t.step_count == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"micro_batch_size": 2, "forward_micro_batch_size": 3},
     r"forward_micro_batch_size=3 is not a multiple of micro_batch_size=2; use 2 or 4"),
    ({"micro_batch_size": 2, "forward_micro_batch_size": 0},
     r"forward_micro_batch_size=0 must be a positive int \(a multiple of micro_batch_size\)"),
    ({"micro_batch_size": 2, "forward_micro_batch_size": "big"},
     r"forward_micro_batch_size='big' must be a positive int"),
    ({"micro_batch_size": "auto", "forward_micro_batch_size": 8},
     r"forward_micro_batch_size=8 must be a multiple of micro_batch_size, which is 'auto'"),
    ({"micro_batch_size": 2, "forward_micro_batch_size": 8, "schedule": "per-microbatch"},
     r"schedule='per-microbatch': only schedule='harmony' runs a forward over several"),
    ({"micro_batch_size": 2, "forward_micro_batch_size": "auto", "schedule": "resident"},
     r"schedule='resident': only schedule='harmony'"),
])
def test_forward_micro_batch_size(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        harmony.Trainer(mlp(), LOSS, **kwargs)  # type: ignore[arg-type]


def _all_dropout() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.1)) for _ in range(4)),
                         nn.Linear(16, 5))


def test_forward_groups_on_a_model_whose_layers_cannot_group() -> None:
    """Every pack with a forward of its own holds dropout: asking for forward groups says
    which layer prevents them and why, before anything trains."""
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    model = _all_dropout()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with harmony.Trainer(model, LOSS, micro_batch_size=2, forward_micro_batch_size=8,
                         device_memory="12KiB") as t, pytest.raises(
            ValueError, match=r"forward_micro_batch_size=8 asks for forwards over several "
                              r"micro-batches, but no pack can run one: layer 0 \('0'\) draws "
                              r"random numbers in its forward \(dropout\)"):
        t.step(x, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # one pack (everything fits): its forward runs inside its backward, nothing to refuse
    with harmony.Trainer(_all_dropout(), LOSS, micro_batch_size=2,
                         forward_micro_batch_size=8) as t:
        t.step(x, y)
        assert t.plan is not None and len(t.plan.bounds) == 1
    # 'auto' asks for nothing: the planner runs a forward per micro-batch
    with harmony.Trainer(_all_dropout(), LOSS, micro_batch_size=2,
                         forward_micro_batch_size="auto", device_memory="12KiB") as t:
        t.step(x, y)
        assert t.plan is not None and len(t.plan.bounds) > 1
        assert all(len(task.mbs) <= 1 for task in t.plan.schedule.tasks)


@pytest.mark.parametrize("shape", [(1,), (2,), (1, 1)])
def test_a_loss_that_is_not_a_scalar_is_refused_up_front_with_its_shape(
        shape: tuple[int, ...]) -> None:
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return LOSS(out, y).reshape(1).expand(shape) if shape != (1,) else LOSS(out, y)[None]

    with harmony.Trainer(model, loss_fn, micro_batch_size=2, device_memory="200KiB") as t:
        with pytest.raises(ValueError, match=rf"loss_fn returned .*{re.escape(str(shape))}.*"
                                             r"scalar"):
            t.step(*_xy())
        assert t.step_count == 0
        assert all(torch.equal(v, initial[k]) for k, v in t.state_dict().items())


def test_a_model_on_the_meta_device_without_weights_says_how_it_is_initialized() -> None:
    """Without init= or weights= a meta-built model is initialized by its modules' own
    reset_parameters(), and the user is told, with the arguments that give other values."""
    with torch.device("meta"):
        model = mlp()
    x, y = _xy()
    with harmony.Trainer(model, LOSS) as t, \
            pytest.warns(UserWarning, match=r"meta device.*init=.*weights="):
        t.step(x, y)


@pytest.mark.parametrize("stepped", [False, True])
def test_state_dict_of_unknown_keys_is_refused_naming_them(stepped: bool) -> None:
    """A key the model does not have (a typo) is named, not an empty dict; one key given as a
    string is that key."""
    model = mlp()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(iter(want))
    with harmony.Trainer(model, LOSS, micro_batch_size=2, device_memory="200KiB") as t:
        if stepped:
            t.step(*_xy())
            want = t.state_dict()
        with pytest.raises(KeyError, match=r"the model has no \['nope'\]"):
            t.state_dict(keys=[key, "nope"])
        got = t.state_dict(keys=key)
        assert got.keys() == {key} and torch.equal(got[key], want[key])
