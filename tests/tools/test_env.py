"""``harmony env`` and the NVMe backend chosen at once, building nothing unasked
(harmony/tools/env.py, swap/aio.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from harmony.tools.cli import main
from swap import aio
from swap.aio import AioUnavailable, find_aio, load_aio_op

ROOT = Path(__file__).resolve().parents[2]


def test_env_reports_the_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--nvme-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "GPUs: none" in out
        assert "pinned host memory: not used (no CUDA device" in out
    assert "aio       DeepSpeed async I/O: " in out
    assert f"odirect   O_DIRECT threads: works in {tmp_path}" in out or \
        "refused by" in out
    assert "CPU Adam (DeepSpeed): " in out
    assert "Trainer defaults: device_memory=None, host_memory=None, nvme_dir=None, " \
           "nvme_backend='auto'" in out
    assert "host memory: " in out and " available" in out
    assert list(tmp_path.iterdir()) == []  # the probe cleaned up after itself


def test_env_without_a_built_op_says_how_to_build_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(aio, "_installed_op", lambda: False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed async I/O: not built; harmony env --build-aio builds it (may take " \
           "several minutes" in out
    assert "give --nvme-dir DIR to probe it there" in out


def test_auto_takes_odirect_at_once_without_importing_deepspeed(tmp_path: Path) -> None:
    """Without a built op, the store picks O_DIRECT threads in a moment, with one line that
    says how to build the faster backend, and neither imports DeepSpeed nor compiles."""
    code = (
        "import logging, sys, time\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from swap.nvme import NvmeStore\n"
        "t0 = time.perf_counter()\n"
        f"s = NvmeStore({str(tmp_path)!r})\n"
        "print(s.backend, round(time.perf_counter() - t0, 3))\n"
        "print(sorted(m for m in sys.modules if m.startswith('deepspeed')))\n"
        "s.close()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "empty"), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    backend, seconds = out.stdout.split("\n")[0].split()
    if find_aio() == "installed with DeepSpeed":
        pytest.skip("DeepSpeed here was installed with its async I/O op compiled in")
    assert backend == "odirect" and float(seconds) < 10
    assert out.stdout.split("\n")[1] == "[]"
    lines = [line for line in out.stderr.splitlines() if "harmony NVMe store" in line]
    assert len(lines) == 1 and "op not built" in lines[0] and \
        "harmony env --build-aio" in lines[0] and lines[0].endswith("using O_DIRECT threads")


@pytest.mark.skipif(find_aio() is None or find_aio() == "installed with DeepSpeed",
                    reason="no JIT-built async I/O op here (harmony env --build-aio)")
def test_a_built_op_loads_without_deepspeeds_builder() -> None:
    code = ("import sys\nfrom swap.aio import load_aio_op\nop = load_aio_op(build=False)\n"
            "print(hasattr(op, 'aio_handle'), 'deepspeed.ops.op_builder' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_building_is_said_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Asked for by name, the op is built, after a line saying it may take minutes."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(aio, "_installed_op", lambda: False)
    monkeypatch.setattr(aio, "_loaded", {})
    said: list[bool] = []

    class Builder:
        def is_compatible(self, verbose: bool = False) -> bool:
            return True

        def load(self, verbose: bool = False) -> object:
            said.append(any("may take several minutes" in r.getMessage()
                            for r in caplog.records))
            return "the op"

    fake = types.SimpleNamespace(AsyncIOBuilder=Builder)
    monkeypatch.setattr(aio.importlib, "import_module", lambda name: fake)
    with caplog.at_level(logging.WARNING, logger="harmony.swap"):
        with pytest.raises(AioUnavailable, match="not built"):
            load_aio_op(build=False)  # never builds unasked
        assert said == []
        assert load_aio_op(build=True) == "the op"
    assert said == [True]
