"""The trainer's settings as one frozen value that checks itself (harmony/training/config.py),
and the trainer composed of owners instead of base classes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import harmony
from harmony.training.config import TrainerConfig
from tests.models import cross_entropy_tokens, mlp, reference_train


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _batches(steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g))
            for _ in range(steps)]


def test_the_config_is_frozen_keyword_only_and_slotted() -> None:
    config = TrainerConfig(micro_batch_size=4, device_memory="64MiB")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.micro_batch_size = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainerConfig(None)  # type: ignore[misc]  # (keyword-only)
    assert not hasattr(config, "__dict__")  # slots: a misspelt setting cannot be added later
    assert config.device_memory == "64MiB"  # as given ...
    assert config.device_memory_bytes == 64 << 20  # ... and in bytes
    assert config.forward_group == 1 and config.update_chunk_budget == "auto"
    assert harmony.TrainerConfig is TrainerConfig


# Each bad setting, with the message the trainer has always given for it.
BAD: list[tuple[dict[str, Any], str]] = [
    ({"check_chain": "yes"}, r"check_chain='yes' must be True or False"),
    ({"optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)},
     r"optimizer=SGD\(\.\.\.\) is an optimizer, not a factory"),
    ({"micro_batch_size": 0}, r"micro_batch_size=0 must be a positive int or 'auto'"),
    ({"schedule": "fast"}, r"schedule='fast' is unknown; choose one of"),
    ({"clip_grad_norm": -1.0}, r"clip_grad_norm=-1.0 must be a positive number or None"),
    ({"nonfinite": "ignore"}, r"nonfinite='ignore' must be 'raise' or 'skip'"),
    ({"prefetch": -1}, r"prefetch=-1 must be None or an int >= 0"),
    ({"update_chunk": "lots"}, r"update_chunk='lots' is not a chunk size"),
    ({"overlap_updates": 1}, r"overlap_updates=1 must be True or False"),
    ({"parallel": "model"}, r"parallel='model' is unknown"),
    ({"stages": [(0, 2)]}, r"stages=\[\(0, 2\)\] needs parallel='pipeline'"),
    ({"shard_optimizer": True}, r"shard_optimizer=True shards the optimizer state"),
    ({"forward_micro_batch_size": 3, "micro_batch_size": 2},
     r"forward_micro_batch_size=3 is not a multiple of micro_batch_size=2"),
    ({"parallel": "pipeline", "update_chunk": "1MiB"},
     r"update_chunk='1MiB' with parallel='pipeline'"),
    ({"device": "mps"}, r"device='mps': harmony runs on 'cpu' or 'cuda'"),
    ({"micro_batch_size": "auto", "parallel": "data"},
     r"micro_batch_size='auto' with parallel='data'"),
    ({"precision": "fp8"}, r"precision"),
    ({"device_memory": "lots"}, r"device_memory='lots'"),
    ({"host_memory": -5}, r"host_memory=-5 must be a non-negative number of bytes"),
]


@pytest.mark.parametrize(("settings", "match"), BAD, ids=[str(s) for s, _ in BAD])
def test_a_bad_setting_is_refused_by_the_config_and_the_trainer_alike(
        settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as made:
        TrainerConfig(**settings)  # no model needed
    model = mlp()
    with pytest.raises(ValueError, match=match) as built:
        harmony.Trainer(model, nn.functional.cross_entropy, **settings)
    assert str(built.value) == str(made.value)
    harmony.Trainer(model, nn.functional.cross_entropy).close()  # the model was not taken


def test_config_and_keyword_settings_train_bit_for_bit_alike() -> None:
    settings: dict[str, Any] = {"optimizer": _sgd, "micro_batch_size": 2,
                                "device_memory": "120KiB", "seed": 3}
    batches = _batches()
    runs = []
    for given in ({"config": TrainerConfig(**settings)}, settings):
        with harmony.Trainer(mlp(), nn.functional.cross_entropy, **given) as t:
            for x, y in batches:
                t.step(x, y)
            assert t.plan is not None and len(t.plan.bounds) > 1  # (the budget swaps packs)
            runs.append(t.state_dict())
    want = reference_train(mlp(), nn.functional.cross_entropy, _sgd, batches, 2)
    for got in runs:
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_trainer_reads_its_settings_from_its_config() -> None:
    config = TrainerConfig(micro_batch_size=2, seed=7, clip_grad_norm=1.0, host_memory="1MiB")
    with harmony.Trainer(mlp(), nn.functional.cross_entropy, config=config) as t:
        assert t.config is config
        assert (t.micro_batch_size, t.seed, t.clip_grad_norm) == (2, 7, 1.0)
        assert (t.device_memory, t.host_memory, t.schedule_name) == (None, 1 << 20, "harmony")
        with pytest.raises(AttributeError):
            t.seed = 8  # type: ignore[misc]  # (the settings are frozen)


def test_settings_beside_a_config_or_unknown_ones_are_refused() -> None:
    with pytest.raises(TypeError, match=r"\['micro_batch_sise'\]; its settings are"):
        harmony.Trainer(mlp(), nn.functional.cross_entropy, micro_batch_sise=2)
    with pytest.raises(TypeError, match=r"\['seed'\] were given beside it"):
        harmony.Trainer(mlp(), nn.functional.cross_entropy, config=TrainerConfig(), seed=1)
    with pytest.raises(TypeError, match="is not a harmony.TrainerConfig"):
        harmony.Trainer(mlp(), nn.functional.cross_entropy,
                        config={"seed": 1})  # type: ignore[arg-type]


def test_the_trainer_is_composed_not_inherited() -> None:
    """Its parts are owners it holds (no base class declares attributes it does not set)."""
    assert harmony.Trainer.__bases__ == (object,)
    with harmony.Trainer(mlp(), nn.functional.cross_entropy, micro_batch_size=4) as t:
        assert t.runtime is None and t.optimizer_state() == ({}, {}, [])
        t.step(*_batches(1)[0])
        assert t.runtime is not None and t.planner.profiles is not None
        tensors, _, groups = t.optimizer_state()  # (AdamW, the default)
        assert set(tensors) == {f"{k}/{name}" for k, _ in mlp().named_parameters()
                                for name in ("step", "exp_avg", "exp_avg_sq")}
        assert len(groups) == len(t.runtime.packs)


def test_from_pretrained_takes_a_config(tmp_path: Path) -> None:
    """``from_pretrained(path, loss_fn, config=...)`` reads the weights from ``path`` as the
    keyword form does, leaving the given config as it was."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from tests.model.test_hf_weights import _batches as token_batches
    from tests.model.test_hf_weights import _llama

    _llama(False).save_pretrained(tmp_path / "src")  # type: ignore[attr-defined]
    config = TrainerConfig(micro_batch_size=2, device_memory="200KiB")
    with harmony.Trainer(_llama(False), cross_entropy_tokens, config=config) as ref, \
            harmony.Trainer.from_pretrained(tmp_path / "src", cross_entropy_tokens,
                                            config=config) as t:
        assert t.config.weights == tmp_path / "src" and config.weights is None
        for x, y in token_batches():
            assert ref.step(x, y) == t.step(x, y)
        want, got = ref.state_dict(), t.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
