"""Trainer.record_step: one call, one optimizer step (the first one included), and a path it
cannot write to is refused before the step runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import harmony
from tests.fs import tmpfs
from tests.models import MODELS, training_state_bytes

FACTORY, LOSS, DATA = MODELS["transformer"]


def _trainer() -> harmony.Trainer:
    return harmony.Trainer(FACTORY(0.0), LOSS, micro_batch_size=2,
                           device_memory=training_state_bytes(FACTORY(0.0), 8) // 2)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return DATA(6, torch.Generator().manual_seed(0))


def test_record_step_on_a_fresh_trainer_takes_one_step(tmp_path: Path) -> None:
    with _trainer() as plain:
        plain.step(*_batch())
        want = plain.state_dict()
    with _trainer() as t:
        loss = t.record_step(*_batch(), tmp_path / "step.json")
        assert t.step_count == 1
        got = t.state_dict()
        assert t.plan is not None
        data = json.loads((tmp_path / "step.json").read_text())
        assert data["step"] == 0 and data["loss"] == loss
        assert data["first"] is True and data["planning_seconds"] > 0
        assert [r["task"] for r in data["tasks"]] == [str(x) for x in t.plan.schedule.tasks]
        t.record_step(*_batch(), tmp_path / "again.json")  # a later step: no planning
        again = json.loads((tmp_path / "again.json").read_text())
        assert again["step"] == 1 and again["first"] is False and t.step_count == 2
    assert all(torch.equal(got[k], want[k]) for k in want)


def _refused(t: harmony.Trainer, path: Path, match: str) -> None:
    before = t.state_dict()
    with pytest.raises(OSError, match=match):
        t.record_step(*_batch(), path)
    assert t.step_count == 0
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())


def test_an_unwritable_record_path_is_refused_before_the_step(tmp_path: Path) -> None:
    with _trainer() as t:
        (tmp_path / "a_dir").mkdir()
        _refused(t, tmp_path / "a_dir", r"record_step.*a_dir.*is a directory.*not run")
        (tmp_path / "a_file").write_text("x")
        _refused(t, tmp_path / "a_file" / "step.json", r"record_step.*step\.json.*not run")
        _refused(t, tmp_path / "missing" / "step.json", r"record_step.*not run")
        if os.geteuid() == 0:
            with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
                _refused(t, ro / "step.json", r"record_step.*Read-only.*not run")
        assert list(tmp_path.glob("**/.*step*")) == []
        t.record_step(*_batch(), tmp_path / "step.json")  # a good path still works
        assert t.step_count == 1
