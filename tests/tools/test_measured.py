"""Trainer.record_step and harmony report --run: a real step next to its prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import harmony
from harmony.tools.cli import main
from tests.models import MODELS, training_state_bytes


def _recorded(tmp_path: Path) -> tuple[Path, harmony.Trainer]:
    factory, loss_fn, data = MODELS["transformer"]
    budget = training_state_bytes(factory(0.0), 8) // 2
    t = harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2, device_memory=budget)
    path = tmp_path / "step.json"
    g = torch.Generator().manual_seed(0)
    t.record_step(*data(6, g), path)
    return path, t


def test_record_step_writes_every_task_and_matching_totals(tmp_path: Path) -> None:
    path, t = _recorded(tmp_path)
    with t:
        data = json.loads(path.read_text())
        assert t.plan is not None
        assert [r["task"] for r in data["tasks"]] == [str(x) for x in t.plan.schedule.tasks]
        assert data["step"] == 0 and t.step_count == 1  # one call, one step (the first)
        starts = [r["start"] for r in data["tasks"]]
        assert starts == sorted(starts) and data["seconds"] >= data["tasks"][-1]["end"]
        peak = max(r["bytes"]["device"] for r in data["tasks"])
        assert peak <= data["peak_bytes"]["device"] <= t.device_memory  # type: ignore[operator]
        # one step's traffic is exactly what the schedule says
        assert data["bytes_moved"]["host->device"] == \
            t.plan.predicted.bytes_moved["host->device"]


def test_report_run_shows_measured_next_to_predicted(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, t = _recorded(tmp_path)
    t.close()
    assert main(["report", "ignored", "--run", str(path)]) == 0
    assert main(["report", "--run", str(path)]) == 0  # as record_step's docstring writes it
    out = capsys.readouterr().out
    assert "| device |" in out and "measured peak" in out and "host->device" in out
    assert "step time: measured" in out and "longest tasks:" in out
    pytest.importorskip("matplotlib")
    png = tmp_path / "step.png"
    assert main(["report", "ignored", "--run", str(path), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_report_run_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main(["report", "ignored", "--run", str(bad)]) == 2


def test_report_without_model_or_run_names_what_is_missing(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--batch-size", "4"]) == 2
    assert "MODEL is required" in capsys.readouterr().err
