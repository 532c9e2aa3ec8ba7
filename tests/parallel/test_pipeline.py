"""Pipelined harmony on two CPU processes (gloo): exactness against one process, failure,
traffic against the simulator, and bad input.

Each test starts two ranks running tests/pipeline_worker.py's ``run`` on a free port and joins
them with a timeout (a hung rank is killed and the test fails, it never hangs). The ranks are
forked from a fresh fork server that imported torch once, not from pytest's process: that one
may hold threads of earlier tests' trainers, and a fork copies their locks held.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import harmony
from harmony.io import checkpoint
from schedules.simulate import simulate
from schedules.task import Loc
from tests import copier
from tests import pipeline_worker as worker
from tests.models import MODELS, reference_train

JOIN_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, ranks: int = 2, **options: Any) -> tuple[list[int | None], float]:
    """Run ``ranks`` forked ranks; returns their exit codes (None: killed after JOIN_S) and
    the seconds until the last one ended."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.pipeline_worker"])
    port = _free_port()
    procs = [ctx.Process(target=worker.run, args=(r, ranks, port, str(out)), kwargs=options)
             for r in range(ranks)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    codes: list[int | None] = []
    for p in procs:
        p.join(max(0.0, JOIN_S - (time.monotonic() - t0)))
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes, time.monotonic() - t0


def _results(out: Path, ranks: int = 2) -> list[dict[str, Any]]:
    errors = [f.read_text() for f in sorted(out.glob("*.err"))]
    assert not errors, "\n".join(errors)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]
    # the ranks run with this run's copier (a child inherits HARMONY_COPIER)
    assert [r["copier"] for r in results] == [copier.expected()] * ranks
    return results


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The ranks compute with one thread each; so does the reference (the same summation
    order inside matrix products, so the comparison can be bitwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reference(steps: int, dropout: float) -> dict[str, torch.Tensor]:
    return reference_train(worker.make_model(dropout), MODELS[worker.MODEL][1], worker.optimizer,
                           worker.batches(steps), worker.MICRO)


@pytest.mark.parametrize(("budget", "env_init"), [(None, True), (200_000, False)],
                         ids=["resident-torchrun-env", "swapping"])
def test_two_ranks_equal_one_process(tmp_path: Path, one_thread: None, budget: int | None,
                                     env_init: bool) -> None:
    steps, dropout = 3, 0.1
    codes, _ = _launch(tmp_path, steps=steps, dropout=dropout, device_memory=budget,
                       env_init=env_init)
    assert codes == [0, 0]
    ranks = _results(tmp_path)
    want = _reference(steps, dropout)
    # The same operations in the same order as plain gradient accumulation (the boundary
    # activations and their gradients cross ranks unchanged): bit for bit.
    for r in ranks:
        assert r["state"].keys() == want.keys()
        for k in want:
            assert torch.equal(r["state"][k], want[k]), (k, (r["state"][k] - want[k]).abs().max())
        assert r["steps"] == steps
    assert ranks[0]["losses"] == ranks[1]["losses"]
    single = harmony.Trainer(worker.make_model(dropout), MODELS[worker.MODEL][1],
                             optimizer=worker.optimizer, micro_batch_size=worker.MICRO)
    assert ranks[0]["losses"] == [single.step(x, y) for x, y in worker.batches(steps)]
    assert [r["stage"] for r in ranks] == list(ranks[0]["stages"])
    assert ranks[0]["stage"][1] == ranks[1]["stage"][0]
    if budget is not None:  # each stage swaps its packs' weights in and out
        for r in ranks:
            assert Loc.HOST in r["placement"].w
            assert r["bytes"]["host->device"] > 0


def test_state_dict_before_the_first_step_is_the_models(tmp_path: Path, one_thread: None) -> None:
    """Before the first step no rank has built its packs: each holds the whole model, and
    state_dict() gives its weights (as the first thing a training script reads)."""
    codes, _ = _launch(tmp_path, steps=1, dropout=0.0, initial=True)
    assert codes == [0, 0]
    want = worker.make_model(0.0).state_dict()
    for r in _results(tmp_path):
        assert r["before"].keys() == want.keys()
        assert all(torch.equal(r["before"][k], want[k]) for k in want)


def test_a_frozen_layer_used_twice_on_one_stage_equals_one_process(tmp_path: Path,
                                                                    one_thread: None) -> None:
    """A frozen module used by two packs of the same stage: each pack gets its own copy of it,
    as in one process, instead of both binding the one tensor (which one of them swapped
    out)."""
    codes, _ = _launch(tmp_path, steps=3, frozen_shared=True, stages=[(0, 5), (5, 6)],
                       device_memory=3500)
    assert codes == [0, 0]
    ranks = _results(tmp_path)
    model = worker.frozen_shared_model()  # plain PyTorch (its forward calls the module twice)
    opt = worker.optimizer([p for p in model.parameters() if p.requires_grad])
    for x, y in worker.frozen_shared_batches(3):
        for xm, ym in zip(x.split(worker.MICRO), y.split(worker.MICRO)):
            (torch.nn.functional.mse_loss(model(xm), ym) * (len(ym) / len(y))).backward()
        opt.step()
        opt.zero_grad()
    want = model.state_dict()
    assert len(ranks[0]["bounds"]) > 2, "the stage was expected to hold several packs"
    for r in ranks:
        assert r["state"].keys() == want.keys()
        for k in want:
            assert torch.equal(r["state"][k], want[k]), k


def test_given_stages_are_kept(tmp_path: Path, one_thread: None) -> None:
    codes, _ = _launch(tmp_path, steps=1, stages=[(0, 4), (4, 5)])
    ranks = _results(tmp_path)
    assert codes == [0, 0]
    bounds = ranks[0]["bounds"]
    layers = [(bounds[a][0], bounds[b - 1][1]) for a, b in ranks[0]["stages"]]
    assert layers == [(0, 4), (4, 5)]
    want = _reference(1, 0.1)
    for k in want:
        assert torch.equal(ranks[1]["state"][k], want[k]), k


def test_bad_stages_fail_on_every_rank(tmp_path: Path) -> None:
    codes, _ = _launch(tmp_path, steps=1, stages=[(0, 2), (3, 5)])
    assert codes == [1, 1]
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "ValueError: stages=[(0, 2), (3, 5)]: stage 1 is 3..5 but must start at 2" in err


def test_save_on_rank0_holds_everything_and_every_rank_resumes(tmp_path: Path,
                                                               one_thread: None) -> None:
    ckpt = tmp_path / "ckpt"
    first, resumed, single = tmp_path / "first", tmp_path / "resumed", tmp_path / "single"
    for d in (first, resumed, single):
        d.mkdir()
    codes, _ = _launch(first, steps=2, save=str(ckpt), device_memory=200_000)
    assert codes == [0, 0]
    ranks = _results(first)
    weights, optimizer, meta = checkpoint.load(ckpt)
    assert meta["step_count"] == 2
    for k, v in ranks[0]["state"].items():  # every stage's weights, from rank 0's file
        assert torch.equal(weights[k], v), k
    exported = safetensors.torch.load_file(tmp_path / "ckpt-export" / "model.safetensors")
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    params = [k for k, _ in worker.make_model(0.0).named_parameters()]
    assert {k.split("/")[0] for k in optimizer} == set(params)  # every stage's optimizer state
    codes, _ = _launch(resumed, steps=3, load=str(ckpt), device_memory=200_000)
    assert codes == [0, 0]
    want = _reference(3, 0.1)
    for r in _results(resumed):
        assert len(r["losses"]) == 1 and r["steps"] == 3
        for k in want:
            assert torch.equal(r["state"][k], want[k]), k
    # a one-process trainer resumes from the pipeline's checkpoint too
    t = harmony.Trainer(worker.make_model(0.1), MODELS[worker.MODEL][1],
                        optimizer=worker.optimizer, micro_batch_size=worker.MICRO)
    t.load(ckpt)
    t.step(*worker.batches(3)[2])
    for k, v in t.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_placement_that_fits_on_no_rank_but_one_stops_every_rank(tmp_path: Path) -> None:
    # rank 0 holds the embedding alone (it fits anywhere); rank 1's four blocks fit neither the
    # device budget nor the host budget
    codes, _ = _launch(tmp_path, steps=1, stages=[(0, 1), (1, 5)], device_memory=200_000,
                       host_memory=100_000)
    assert codes == [1, 1]
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "InfeasiblePlan: pipeline rank 1 (packs 1.." in err, err
        assert "host_memory=97.66KiB" in err


def test_a_failing_rank_stops_every_rank(tmp_path: Path) -> None:
    # rank 1's second-to-last layer raises on its 10th call: in the second or third step
    codes, seconds = _launch(tmp_path, steps=4, fail_at=(1, 10), timeout_s=20.0)
    assert None not in codes, f"a rank hung: {codes}"
    assert codes == [1, 1]
    assert seconds < JOIN_S
    assert "injected failure" in (tmp_path / "rank1.err").read_text()
    err0 = (tmp_path / "rank0.err").read_text()
    assert "pipeline rank 0" in err0 and "another rank" in err0, err0


def test_a_stuck_rank_makes_its_peer_time_out(tmp_path: Path) -> None:
    start = time.time()
    codes, _ = _launch(tmp_path, steps=3, fail_at=(1, 10), hang_s=10.0, timeout_s=3.0)
    assert codes[0] == 1 and codes[1] is not None and codes[1] != 0, codes
    err0 = tmp_path / "rank0.err"
    assert "pipeline rank 0" in err0.read_text()
    # rank 0 gave up after the group's 3 s timeout, long before rank 1 woke up
    assert err0.stat().st_mtime - start < 10.0


def test_traffic_matches_the_simulator_per_rank(tmp_path: Path) -> None:
    steps = 2
    codes, _ = _launch(tmp_path, steps=steps, device_memory=200_000)
    ranks = _results(tmp_path)
    assert codes == [0, 0]
    for r in ranks:
        predicted = simulate(r["schedule"], r["sizes"]).bytes_by_kind
        between = {k: v for k, v in r["by_kind"].items() if k[0].startswith("rank")}
        assert between == {k: steps * v for k, v in predicted.items()
                           if k[0].startswith("rank")}
        assert set(between) == {("rank0->rank1", "X"), ("rank1->rank0", "D")}
        for key in [("host->device", "W"), ("device->host", "G")]:
            assert r["by_kind"].get(key, 0) == steps * predicted.get(key, 0), key
    # what one rank sends is what the other receives
    assert ranks[0]["bytes"]["rank0->rank1"] == ranks[1]["bytes"]["rank0->rank1"]


def test_pipeline_without_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError,
                       match=r"parallel=.pipeline. needs a process group.*torchrun"):
        harmony.Trainer(worker.make_model(0.0), MODELS[worker.MODEL][1], parallel="pipeline")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"parallel": "tensor"}, "parallel='tensor' is unknown; use None"),
    ({"stages": [(0, 5)]}, "needs parallel='pipeline'"),
    ({"parallel": "pipeline", "schedule": "per-microbatch"}, "runs schedule='harmony'"),
    ({"parallel": "pipeline", "clip_grad_norm": 1.0}, "without clip_grad_norm"),
])
def test_bad_pipeline_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        harmony.Trainer(worker.make_model(0.0), MODELS[worker.MODEL][1], **kwargs)
