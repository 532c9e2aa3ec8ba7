"""Data-parallel harmony with two gloo ranks on CPU, against one process on the global batch.

Each rank is a child of a fork server (so it starts with torch imported) that sets torchrun's
variables and runs tests/dp_worker.py's ``main``: the trainer initializes the gloo
group from that environment, as under ``torchrun --nproc_per_node=2``. Every wait on a child
has a timeout, and the children are killed if they outlive it.

The weights are compared with a relative tolerance, not ``torch.equal``: one process adds the
micro-batch gradients one after the other, while the all-reduce adds each rank's partial sum,
so the additions are grouped differently and round differently (about 1e-7 relative here).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import harmony
from tests import copier
from tests.dp_worker import fork_ranks, global_batches, make_trainer, parse, run_rank

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not torch.distributed.is_available(),
                                reason="the ranks are forked children using gloo")

WORLD = 2
TIMEOUT = 60.0  # seconds any run may take before the test fails (and kills it)


def _launch(out: Path, argv: list[str], env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> list[int | None]:
    """Run the ranks of tests/dp_worker.py; returns their exit codes (None: killed)."""
    argv = ["--out", str(out), *argv]
    return fork_ranks(run_rank, (argv,), out, WORLD, timeout, env)


def _log(out: Path, rank: int) -> str:
    path = out / f"log{rank}"
    return path.read_text() if path.exists() else ""


def _run(tmp_path: Path, argv: list[str]) -> tuple[list[dict], dict[str, torch.Tensor],
                                                   list[float]]:
    """The ranks' results, and one process's weights and losses on the global batches."""
    args = parse(["--out", str(tmp_path), *argv])
    shards = [int(s) for s in args.shards.split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks compute (kernels round differently per thread count)
    try:
        with make_trainer(args, None) as one:
            losses = [one.step(x, y)
                      for x, y in global_batches(args.model, sum(shards), args.steps)]
            want = one.state_dict()
    finally:
        torch.set_num_threads(threads)
    codes = _launch(tmp_path, argv)
    assert codes == [0] * WORLD, [_log(tmp_path, r)[-3000:] for r in range(WORLD)]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # the ranks run with this run's copier (a child inherits HARMONY_COPIER)
    assert [r["copier"] for r in results] == [copier.expected()] * WORLD
    return results, want, losses


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


CASES = {
    # swapping (half the training state on the device) with global-norm clipping
    "swap-clip": ["--swap", "--clip", "0.5", "--steps", "3"],
    # (the tiny transformer is no model for AdamW here: the key bias of attention has a zero
    # gradient up to rounding, which Adam scales up to lr-sized steps of rounding noise)
    "adamw-swap": ["--model", "mlp", "--swap", "--opt", "adamw", "--steps", "3"],
    # dropout: masks follow the global micro-batch index
    "dropout": ["--dropout", "0.2", "--swap", "--steps", "3"],
    # unequal shards (5 + 3 samples; micro-batches 2,2,1 | 2,1): exact up to rounding
    "uneven": ["--shards", "5,3", "--swap", "--steps", "3"],
    "per-microbatch": ["--schedule", "per-microbatch", "--swap", "--steps", "2"],
    "mlp-on-device": ["--model", "mlp", "--shards", "6,6", "--mbs", "3", "--steps", "3"],
    # weights and optimizer state of some packs in NVMe files
    "nvme": ["--nvme", "--opt", "adamw", "--model", "mlp", "--steps", "3"],
    # the token embedding tied to the head: the owner adds the sharer's all-reduced gradient
    "tied-clip": ["--model", "tied", "--swap", "--clip", "0.5", "--steps", "3"],
    # bf16 weights, fp32 gradients (reduced as fp32) and masters
    "bf16-clip": ["--precision", "bf16", "--swap", "--clip", "0.5", "--steps", "3"],
    # forwards over 4 micro-batches of 2 on each rank (one process: the same groups of the
    # global batch's micro-batches), backward per micro-batch
    "forward-groups": ["--model", "mlp", "--shards", "8,8", "--forward", "8", "--swap",
                       "--steps", "3"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_equals_one_process(tmp_path: Path, case: str) -> None:
    results, want, losses = _run(tmp_path, CASES[case])
    r0, r1 = results
    assert r0["state"].keys() == want.keys()
    worst = 0.0
    for k, w in want.items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between the ranks"
        worst = max(worst, _rel(r0["state"][k], w))
    assert worst <= 1e-6, worst
    # the weights moved: comparing untrained weights would prove nothing
    with make_trainer(parse(["--out", str(tmp_path), *CASES[case]]), None) as fresh:
        start = fresh.state_dict()
    assert max(_rel(want[k], v) for k, v in start.items()) > 1e-3
    assert r0["nvme"] == (case == "nvme")
    assert ("F0.0-3" in r0["schedule"].split()) == (case == "forward-groups")
    # every rank returns the global batch's mean loss
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(losses, rel=1e-6)
    # rank 0 wrote the checkpoint; every rank loaded the same weights and step count
    for r in results:
        assert r["loaded_steps"] == len(losses)
        assert all(torch.equal(r["loaded"][k], r0["state"][k]) for k in want)


@pytest.mark.parametrize("case", ["swap-clip", "uneven"])
def test_traffic_matches_the_simulator(tmp_path: Path, case: str) -> None:
    """Each rank's bytes per link in a step (all-reduce included) are the simulator's."""
    results, _, _ = _run(tmp_path, CASES[case])
    for r in results:
        assert r["bytes"] == r["predicted"], (r["bytes"], r["predicted"])
        # a ring all-reduce over 2 ranks sends 2 (2-1) / 2 = 1x the gradient bytes
        assert r["bytes"]["allreduce"] == r["g_bytes"] > 0
        assert r["bytes"]["host->device"] > 0  # the budget forced swaps
    assert results[0]["packs"] == results[1]["packs"] > 1


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_stops_every_rank(tmp_path: Path, mode: str) -> None:
    """Rank 1 raises in a forward of step 1 and lingers 12 s before exiting; rank 0 must fail
    at once (the group is torn down), neither at the group's timeout (8 s here) nor when rank 1
    exits. A rank that hangs instead (sleeps 5 s in a forward) makes rank 0 fail at the group's
    timeout (3 s here), and rank 1 fails when it wakes (rank 0 tore the group down)."""
    linger = 12.0 if mode == "raise" else 5.0
    timeout = "8" if mode == "raise" else "3"
    flag = "--fail-at" if mode == "raise" else "--hang-at"
    t0 = time.monotonic()
    codes = _launch(tmp_path, ["--swap", "--steps", "3", flag, "1", "--linger", str(linger)],
                    env={"HARMONY_DIST_TIMEOUT": timeout}, timeout=40)
    elapsed = time.monotonic() - t0
    logs = [_log(tmp_path, r) for r in range(WORLD)]
    assert codes[0] not in (0, None), logs
    failed0 = [line for line in logs[0].splitlines() if line.startswith("FAILED")]
    assert failed0, logs[0][-3000:]
    assert "another rank failed or stopped answering" in failed0[0]
    start_word = "RAISED" if mode == "raise" else "HUNG"
    start = [line for line in logs[1].splitlines() if line.startswith(start_word)]
    assert start, logs[1][-3000:]
    delay = float(failed0[0].split()[1]) - float(start[0].split()[1])
    if mode == "raise":
        assert codes[1] not in (0, None), logs[1][-3000:]
        assert delay < 5.0, delay  # well before the timeout (8 s) and rank 1's exit (12 s)
    else:
        assert 2.5 < delay < 3.0 + 5.0, delay  # the timeout, plus slack for a loaded machine
        assert codes[1] not in (0, None), logs[1][-3000:]
    assert elapsed < 40


def test_parallel_bogus_is_refused() -> None:
    with pytest.raises(ValueError, match=r"parallel='bogus' is unknown.*'data'"):
        harmony.Trainer(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.functional.mse_loss,
                        parallel="bogus")


def test_parallel_data_without_a_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"parallel='data' needs a process group.*torchrun "
                                         r"--nproc_per_node=N.*init_process_group"):
        harmony.Trainer(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.functional.mse_loss,
                        parallel="data")


def test_parallel_none_is_one_process() -> None:
    for value in (None, "none"):
        with harmony.Trainer(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                             torch.nn.functional.mse_loss, parallel=value) as t:
            t.step(torch.ones(2, 2), torch.zeros(2, 2))
            assert "allreduce" not in t.stats.bytes_moved


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path: Path) -> None:
    """Rank 1's loss is NaN in step 1 of 3: the global loss is NaN on both ranks, both skip
    the step, and the weights are one process's trained on steps 0 and 2 only."""
    argv = ["--model", "mlp", "--swap", "--steps", "3", "--nonfinite", "skip", "--nan-at", "1"]
    codes = _launch(tmp_path, argv)
    assert codes == [0, 0], [_log(tmp_path, r)[-3000:] for r in range(WORLD)]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for r in (r0, r1):
        assert r["skipped"] == 1 and r["steps"] == 2
        assert r["losses"][1] != r["losses"][1]  # NaN
    args = parse(["--out", str(tmp_path), *argv])
    batches = global_batches(args.model, 8, 3)
    with make_trainer(args, None) as one:
        for x, y in (batches[0], batches[2]):
            one.step(x, y)
        want = one.state_dict()
    for k, w in want.items():
        assert torch.equal(r0["state"][k], r1["state"][k])
        assert _rel(r0["state"][k], w) <= 1e-6


def _export_rank(rank: int, out: Path, shard: bool) -> None:
    """Export before the first step and after two, recording which ranks wrote files and
    whether each export, once returned, holds this rank's weights (see the test below)."""
    from safetensors.torch import load_file

    import harmony.training.state_io as state_io

    writers: list[int] = []
    write_shards = state_io.write_shards

    def spy(*args: object, **kwargs: object) -> object:
        writers.append(rank)
        return write_shards(*args, **kwargs)  # type: ignore[arg-type]

    state_io.write_shards = spy  # type: ignore[assignment]
    args = parse(["--out", str(out), "--swap", "--opt", "adamw", "--model", "mlp",
                  *(["--shard", "--precision", "bf16"] if shard else [])])
    trainer = make_trainer(args, "data")
    equal = []
    for step, (x, y) in enumerate(global_batches(args.model, 8, 3)):
        if step != 1:
            folder = trainer.export(out / f"export{step}")
            got = load_file(str(folder / "model.safetensors"))
            want = trainer.state_dict()
            equal.append(got.keys() == want.keys()
                         and all(torch.equal(got[k], v) for k, v in want.items()))
        trainer.step(x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])
    trainer.close()
    torch.save({"writers": writers, "equal": equal}, out / f"export{rank}.pt")


@pytest.mark.parametrize("shard", [False, True])
def test_export_is_written_by_rank_0_alone(tmp_path: Path, shard: bool) -> None:
    """Every rank calls export(); rank 0 writes the files (ranks writing the same files race:
    one's rename of its temporary file failed) and the others return once they are complete,
    before the first step and after steps, a sharded optimizer's masters included."""
    codes = fork_ranks(_export_rank, (tmp_path, shard), tmp_path, WORLD, TIMEOUT)
    assert codes == [0] * WORLD, [_log(tmp_path, r)[-3000:] for r in range(WORLD)]
    results = [torch.load(tmp_path / f"export{r}.pt") for r in range(WORLD)]
    assert results[0]["writers"] == [0, 0] and results[1]["writers"] == []
    assert all(r["equal"] == [True, True] for r in results)
