"""harmony report refuses what would run for minutes (a token count given as --batch-size) and
reports an output path it cannot write in one line, exit status 2, before planning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harmony.tools.cli import main
from harmony.tools.report import MAX_MICRO_BATCHES
from tests.fs import tmpfs

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmony", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout)


def test_too_many_micro_batches_are_refused_at_once_with_the_fix() -> None:
    t0 = time.monotonic()
    try:
        done = _cli("report", "gpt-tiny", "--batch-size", "100000", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("harmony report --batch-size 100000 still plans after 60 s")
    assert time.monotonic() - t0 < 60
    assert done.returncode == 2
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "100000 micro-batches" in err and str(MAX_MICRO_BATCHES) in err
    assert "--micro-batch-size" in err and "sequences" in err


def test_the_largest_count_allowed_still_plans(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "gpt-tiny", "--batch-size", str(MAX_MICRO_BATCHES * 4),
                 "--micro-batch-size", "4"]) == 0
    assert main(["report", "gpt-tiny", "--batch-size", str(MAX_MICRO_BATCHES * 4 + 1),
                 "--micro-batch-size", "4"]) == 2


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_an_output_path_that_is_a_directory_is_one_line_and_exit_2(tmp_path: Path,
                                                                  flag: str) -> None:
    done = _cli("report", "gpt-tiny", "--batch-size", "4", flag, str(tmp_path))
    assert done.returncode == 2
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(tmp_path) in err and "directory" in err


def test_an_output_path_on_a_read_only_file_system_is_one_line_and_exit_2(
        tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only filesystem needs root")
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        for flag in ("--json", "--measure-layers"):
            done = _cli("report", "gpt-tiny", "--batch-size", "4", flag, str(ro / "out.json"))
            assert done.returncode == 2, done.stdout
            err = done.stderr.strip()
            assert "\n" not in err and "Traceback" not in err, err
            assert str(ro / "out.json") in err and "Read-only" in err
