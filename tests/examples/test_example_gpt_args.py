"""examples/train_gpt.py refuses impossible arguments with one line before allocating, and its
default budget fits every model it builds."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_gpt.py"


def _limit_memory() -> None:
    """A run that allocates more than this fails instead of taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--plot", "", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limit_memory)


def _refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode not in (0, None), done.stdout[-2000:]
    err = done.stderr.strip()
    assert "Traceback" not in err, err[-3000:]
    assert err.count("\n") == 0 or err.splitlines()[0].startswith("usage:"), err
    for w in words:
        assert w in err, err


def test_a_context_longer_than_the_text_is_refused_before_allocating() -> None:
    _refused(_run("--block-size", "100000000"), "--block-size 100000000", "characters")


def test_a_model_larger_than_memory_is_refused_before_allocating() -> None:
    _refused(_run("--n-embd", "65536", "--n-head", "1", "--n-layer", "64"),
             "parameters", "memory")


def test_a_negative_or_zero_learning_rate_is_refused() -> None:
    for lr in ("-1", "0", "nan"):
        _refused(_run("--lr", lr), f"--lr {lr}", "positive")


def test_one_layer_trains_with_the_default_budget() -> None:
    done = _run("--n-layer", "1", "--steps", "2", "--eval-every", "1", "--eval-batches", "1",
                "--sample-chars", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final: train loss" in done.stdout
