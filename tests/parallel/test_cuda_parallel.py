"""Data and pipeline parallelism over NCCL on two GPUs (skipped without two).

Each rank is a new Python process with torchrun's variables (a fork would inherit this
process's CUDA state, which CUDA refuses). Both runs check what only a real NCCL group shows:
each rank computes and stages its collectives on its own GPU (``cuda:LOCAL_RANK``), and the
result equals one process training the same global batches on one GPU: bit for bit for the
pipeline (the activations cross ranks unchanged), up to the all-reduce's rounding for data
parallelism (the ranks' partial gradient sums are added in another grouping).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import cuda_parallel_worker as worker
from tests.models import assert_weights_close

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices"),
              pytest.mark.skipif(not torch.distributed.is_available()
                                 or not torch.distributed.is_nccl_available(),
                                 reason="needs NCCL")]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(mode: str, out: Path) -> list[dict]:
    port = _port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(ROOT), "HARMONY_DIST_TIMEOUT": "120",
               "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.cuda_parallel_worker", "--mode", mode, "--out",
             str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank of the {mode} run did not finish in {TIMEOUT:.0f} s")
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _one_process() -> tuple[dict[str, torch.Tensor], list[float]]:
    with worker.trainer(None, "cuda:0") as t:
        losses = [t.step(x, y) for x, y in worker.batches()]
        return t.state_dict(), losses


def test_two_gpus_data_parallel_over_nccl(tmp_path: Path) -> None:
    ranks = _launch("data", tmp_path)
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert [r["current"] for r in ranks] == [0, 1]  # each rank's own GPU is current
    for k in ranks[0]["state"]:  # the all-reduced update is the same on both ranks
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
    assert ranks[0]["losses"] == ranks[1]["losses"]
    want, losses = _one_process()
    assert_weights_close(ranks[0]["state"], want, rtol=1e-5)
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5)


def test_two_gpus_pipeline_over_nccl(tmp_path: Path) -> None:
    ranks = _launch("pipeline", tmp_path)
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
    want, losses = _one_process()
    for r in ranks:
        assert r["state"].keys() == want.keys()
        for k in want:
            assert torch.equal(r["state"][k], want[k]), k
    assert ranks[0]["losses"] == ranks[1]["losses"] == losses
