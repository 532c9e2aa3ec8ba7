"""The benchmark scripts run on a model whose activations outgrow the device budget they size
from its training state: they take the least budget any plan needs and say so, instead of
failing with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harmony

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from bench_common import stepped  # noqa: E402
from gpt import GPT, GPTConfig, loss_fn  # noqa: E402

# Two blocks of 64 channels: a third of its 1.72 MiB training state (586 KiB) cannot hold a
# block's activations at micro-batches of 4 x 64 tokens (the least plan needs 1.64 MiB).
SMALL = ["--n-layer", "2", "--n-embd", "64"]
CONFIG = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 65, (8, 64), generator=torch.Generator().manual_seed(0))
    return x, torch.roll(x, -1, dims=1)


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_stepped_takes_the_least_device_budget_a_plan_needs_and_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    state = 16 * GPT(CONFIG).num_params()
    budgets: list[int] = []

    def make(budget: int) -> harmony.Trainer:
        budgets.append(budget)
        return harmony.Trainer(GPT(CONFIG), loss_fn, micro_batch_size=4, device_memory=budget)

    with stepped(make, state // 3, _batch(), "small") as t:
        assert t.plan is not None and t.stats.peak_bytes["device"] <= budgets[-1]
    assert budgets[0] == state // 3 and budgets[1] > budgets[0]
    err = capsys.readouterr().err
    assert err.startswith("small: a device budget of 586.00KiB leaves no room")
    assert "the least any plan needs" in err

    with stepped(make, 64 << 20, _batch(), "roomy"):  # a budget that fits is kept, silently
        assert budgets[-1] == 64 << 20
    assert capsys.readouterr().err == ""


def test_stepped_raises_when_the_device_is_not_what_is_short() -> None:
    made: list[int] = []

    def make(budget: int) -> harmony.Trainer:  # a device budget above what any plan needs, but
        made.append(budget)                     # no host memory for what the device cannot hold
        return harmony.Trainer(GPT(CONFIG), loss_fn, micro_batch_size=4, device_memory=budget,
                               host_memory=1)

    with pytest.raises(harmony.InfeasiblePlan, match="host"):
        stepped(make, 2 << 20, _batch(), "no host")
    assert made == [2 << 20]  # not made again with another device budget


def test_bench_overhead_runs_a_model_whose_activations_outgrow_a_third_of_its_state() -> None:
    done = _run("bench_overhead.py", *SMALL, "--steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "harmony, budget 1/3: a device budget of 586.00KiB leaves no room" in done.stderr
    assert "| harmony, budget 1/3 |" in done.stdout
    assert "| per-microbatch, budget 1/3 |" in done.stdout


def test_benchmark_runs_a_model_whose_activations_outgrow_a_third_of_its_state(
        tmp_path: Path) -> None:
    done = _run("benchmark.py", "--nvme-dir", str(tmp_path), *SMALL, "--steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "harmony, device 1/3 of the state: a device budget of 586.00KiB" in done.stderr
    row = next(line for line in out.splitlines()
               if line.startswith("| harmony, device 1/3 of the state |"))
    assert "| 1.00 |" in row  # the reference row ran
    assert "could not run" not in next(line for line in out.splitlines()
                                       if line.startswith("| harmony, device 1/3, host 1/3"))


def test_bench_nvme_runs_a_model_whose_activations_outgrow_a_quarter_of_its_state(
        tmp_path: Path) -> None:
    done = _run("bench_nvme.py", "--nvme-dir", str(tmp_path), *SMALL, "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NVMe run: a device budget of 439.50KiB leaves no room" in done.stderr
    assert "| step with W and K on NVMe |" in done.stdout
