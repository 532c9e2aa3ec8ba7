"""``Trainer(parallel="data", shard_optimizer=True)``: each pack's optimizer state on one rank.

Two gloo ranks on CPU (tests/dp_worker.py), against the unsharded data-parallel run and one
process on the global batch. The weights are compared with a relative tolerance, not bit for
bit: the reduce onto the owner adds the ranks' partial gradient sums (as the all-reduce does,
in another grouping than one process's micro-batch after micro-batch), and with clipping the
global norm is the square root of the ranks' summed squares (float64) rather than
``clip_grad_norm_``'s norm of norms, so the clipping coefficient rounds differently.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import harmony
from harmony.io import checkpoint
from harmony.planning.planner import InfeasiblePlan, plan
from schedules.data_parallel import add_reduce_broadcast, lag_updates, owners
from schedules.generators import generate
from schedules.lower import lower
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.simulate import Sizes, simulate
from schedules.task import Loc, Op
from schedules.validate import ScheduleError, validate
from tests.dp_worker import global_batches, make_trainer, parse
from tests.parallel.test_data_parallel import WORLD, _launch, _log, _rel, _run, pytestmark  # noqa: F401
from tests.schedules.test_dp_schedules import _profiles

CASES = {
    # swapping (half the training state on the device), AdamW, global-norm clipping
    "swap-clip": ["--model", "mlp", "--opt", "adamw", "--swap", "--clip", "0.5"],
    # weights and optimizer state of some packs in NVMe files (the owner's update writes
    # them; the other ranks write the weights they receive)
    "nvme": ["--model", "mlp", "--opt", "adamw", "--nvme"],
    # the same with the updates streamed in chunks: the owner broadcasts chunk by chunk,
    # reading each back from its file; the others write each chunk they receive
    "nvme-chunked": ["--model", "mlp", "--opt", "adamw", "--nvme", "--update-chunk", "16KiB"],
    # bf16 weights; the fp32 masters live with the optimizer state, on the owner only
    "bf16-clip": ["--precision", "bf16", "--swap", "--clip", "0.5"],
    # fp16: every rank checks its own packs' gradients for overflow, and all agree
    "fp16": ["--model", "mlp", "--precision", "fp16", "--swap"],
}
MORE = ["--steps", "3", "--more", "2"]  # 3 steps, then 2 more after the checkpoint


@pytest.fixture(scope="module", params=list(CASES))
def runs(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sharded run, the unsharded data-parallel run and one process, on the same data."""
    argv = [*CASES[request.param], *MORE]
    sharded_dir = tmp_path_factory.mktemp("sharded")
    sharded, want, losses = _run(sharded_dir, [*argv, "--shard"])
    plain_dir = tmp_path_factory.mktemp("plain")
    # (the same packs and placement as the sharded run, to compare them pack by pack: with
    # less state per rank, the planner may choose other packs for the sharded run)
    codes = _launch(plain_dir, [*argv, "--plan", str(sharded_dir / "plan.json")])
    assert codes == [0] * WORLD, [_log(plain_dir, r)[-3000:] for r in range(WORLD)]
    plain = [torch.load(plain_dir / f"rank{r}.pt") for r in range(WORLD)]
    return {"sharded": sharded, "plain": plain, "want": want, "losses": losses,
            "dir": sharded_dir, "argv": argv, "case": request.param}


def test_sharded_weights_equal_unsharded_and_one_process(runs: dict[str, Any]) -> None:
    (r0, r1), plain, want = runs["sharded"], runs["plain"][0], runs["want"]
    assert r0["state"].keys() == want.keys()
    start_args = parse(["--out", str(runs["dir"]), *runs["argv"]])
    with make_trainer(start_args, None) as fresh:
        start = fresh.state_dict()
    for k, w in want.items():
        # the ranks hold the same weights, bit for bit (every rank received the owner's W)
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        assert torch.equal(r0["loaded"][k], r1["loaded"][k]), k
        assert _rel(r0["loaded"][k], w) <= 1e-6, k
        assert _rel(r0["loaded"][k], plain["loaded"][k]) <= 1e-6, k
    # the weights moved: comparing untrained weights would prove nothing
    assert max(_rel(want[k], v) for k, v in start.items()) > 1e-3
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(runs["losses"], rel=1e-6)
    assert r0["packs"] > 1  # the budget forced swaps
    assert sum(n for k, n in r0["bytes"].items() if k.endswith("->device")) > 0
    assert r0["nvme"] == runs["case"].startswith("nvme")
    chunks = [n for n, home in zip(r0["shard"]["chunks"], r0["shard"]["homes"])
              if home == "nvme"]
    assert (max(chunks, default=1) > 1) == (runs["case"] == "nvme-chunked"), chunks


def test_each_rank_holds_only_its_packs_optimizer_state(runs: dict[str, Any]) -> None:
    sharded, plain = runs["sharded"], runs["plain"]
    own = sharded[0]["shard"]["owners"]
    assert own is not None and own == sharded[1]["shard"]["owners"]
    assert plain[0]["shard"]["owners"] is None
    assert set(own) == set(range(WORLD))  # both ranks own packs
    full = plain[0]["shard"]["k_charged"]
    assert sum(full) > 0
    per_rank = []
    for rank, r in enumerate(sharded):
        s = r["shard"]
        for p, owner in enumerate(own):
            if owner == rank:  # charged what its optimizer really holds
                assert s["k_charged"][p] == full[p], (rank, p)
                if s["homes"][p] != "nvme":  # (on NVMe the state is in a file between steps)
                    assert s["k_real"][p] == full[p], (rank, p)
                if runs["case"] in ("bf16-clip", "fp16") and s["trains"][p] \
                        and s["homes"][p] != "nvme":
                    assert s["masters"][p], (rank, p)  # the fp32 masters
            else:  # no state and no charge; its optimizer steps nothing
                assert s["k_charged"][p] == s["k_real"][p] == s["k_planned"][p] == 0, (rank, p)
                assert not s["trains"][p] and not s["masters"][p]
        per_rank.append(sum(s["k_charged"]))
    # together the ranks hold the state once; each about half of it (balanced by bytes)
    assert sum(per_rank) == sum(full)
    assert max(per_rank) <= sum(full) / WORLD + max(full)
    assert max(per_rank) < sum(full)


def test_planner_charges_k_only_on_the_owner() -> None:
    """The predicted host peak per rank falls by the K of the packs other ranks own, so a host
    budget too small for every pack's K fits once the state is sharded."""
    profiles = _profiles(6)
    bw = {"host->device": 1e9, "device->host": 1e9, "allreduce": 2e9}
    budget = 20 << 20  # weights must swap: W and K live on the host
    one = plan(profiles, "harmony", [2, 2], budget, None, 2.0, bw)
    fixed = (one.bounds, Placement.uniform(len(one.bounds), Loc.HOST, Loc.DEVICE))
    plain = plan(profiles, "harmony", [2, 2], budget, None, 2.0, bw, ranks=2, local_ranks=2,
                 fixed=fixed)
    peaks = []
    for rank in range(2):
        sharded = plan(profiles, "harmony", [2, 2], budget, None, 2.0, bw, ranks=2,
                       local_ranks=2, fixed=fixed, shard=rank)
        assert sharded.owners == owners(list(plain.sizes.k), 2)
        others = sum(k for p, k in enumerate(plain.sizes.k) if sharded.owners[p] != rank)
        assert others > 0
        assert sharded.predicted.peak[Loc.HOST] == plain.predicted.peak[Loc.HOST] - others
        assert sharded.predicted.bytes_moved["reduce"] == sum(plain.sizes.g)
        assert sharded.predicted.bytes_moved["broadcast"] == sum(plain.sizes.w)
        assert "allreduce" not in sharded.predicted.bytes_moved
        assert sum(t.op is Op.REDUCE for t in sharded.schedule.tasks) == len(one.bounds)
        peaks.append(sharded.predicted.peak[Loc.HOST])
    host_budget = max(peaks)
    assert host_budget < plain.predicted.peak[Loc.HOST]
    with pytest.raises(InfeasiblePlan):
        plan(profiles, "harmony", [2, 2], budget, host_budget, 2.0, bw, ranks=2, local_ranks=2,
             fixed=fixed)
    for rank in range(2):
        plan(profiles, "harmony", [2, 2], budget, host_budget, 2.0, bw, ranks=2, local_ranks=2,
             fixed=fixed, shard=rank)


def test_sharded_traffic_matches_the_simulator(runs: dict[str, Any]) -> None:
    for r in runs["sharded"]:
        if runs["case"].startswith("nvme"):
            # The optimizer state's files: the planner's K is an estimate (k_ratio x G bytes),
            # its file a layout of the real state with each tensor 64-byte aligned.
            nvme = ("host->nvme", "nvme->host")
            for k in nvme:
                assert r["bytes"][k] == pytest.approx(r["predicted"][k], rel=0.01)
            r = {**r, "bytes": {k: v for k, v in r["bytes"].items() if k not in nvme},
                 "predicted": {k: v for k, v in r["predicted"].items() if k not in nvme}}
        assert r["bytes"] == r["predicted"], (r["bytes"], r["predicted"])
        # the gradients go to their owner once, the weights come back once
        assert r["bytes"]["reduce"] == r["g_bytes"] > 0
        assert r["bytes"]["broadcast"] == r["w_bytes"] > 0
        assert "allreduce" not in r["bytes"]


def test_a_sharded_checkpoint_holds_the_whole_optimizer_and_training_goes_on(
        runs: dict[str, Any]) -> None:
    (r0, r1), plain = runs["sharded"], runs["plain"][0]
    _, sharded_opt, _ = checkpoint.load(r0["ckpt"])
    _, plain_opt, _ = checkpoint.load(plain["ckpt"])
    assert sharded_opt.keys() == plain_opt.keys() and sharded_opt
    for k, v in plain_opt.items():
        assert _rel(sharded_opt[k], v) <= 1e-5, k
    # a sharded trainer that loaded it goes on as the one that saved it
    for k in r0["state"]:
        assert torch.equal(r0["more"][k], r1["more"][k]), k
        assert _rel(r0["more"][k], r0["state"][k]) <= 1e-6, k
    # and so does one process that loaded it
    args = parse(["--out", str(runs["dir"]), *runs["argv"]])
    with make_trainer(args, None) as one:
        one.load(r0["ckpt"])
        assert one.step_count == 3
        for x, y in global_batches(args.model, 8, args.steps + args.more)[args.steps:]:
            one.step(x, y)
        got = one.state_dict()
    moved = max(_rel(got[k], r0["loaded"][k]) for k in got)
    assert moved > 1e-4  # the extra steps changed the weights
    for k, v in got.items():
        assert _rel(r0["more"][k], v) <= 1e-6, k


def test_shard_optimizer_needs_parallel_data() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    for parallel in (None, "pipeline"):
        with pytest.raises(ValueError, match=rf"shard_optimizer=True .*parallel={parallel!r}.*"
                                             r"pass parallel='data'"):
            harmony.Trainer(model, torch.nn.functional.mse_loss, parallel=parallel,
                            shard_optimizer=True)
    with pytest.raises(ValueError, match=r"shard_optimizer='yes' must be True or False"):
        harmony.Trainer(model, torch.nn.functional.mse_loss, shard_optimizer="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["harmony", "harmony-clip", "per-microbatch"])
@pytest.mark.parametrize("wk", [Loc.DEVICE, Loc.HOST, Loc.NVME])
def test_reduce_and_broadcast_tasks_are_valid_and_counted(name: str, wk: Loc) -> None:
    packs, mbs = 4, 2
    compute = generate(name.removesuffix("-clip"), packs, mbs, name.endswith("-clip"))
    s = add_reduce_broadcast(lower(lag_updates(compute), Placement.uniform(packs, wk, Loc.HOST),
                                   1))
    validate(s)
    assert Schedule.parse(str(s)).tasks == s.tasks  # the text form round-trips
    tasks = list(s.tasks)
    for p in range(packs):
        reduce = [i for i, t in enumerate(tasks) if t.op is Op.REDUCE and t.pack == p]
        bcast = [i for i, t in enumerate(tasks) if t.op is Op.BROADCAST and t.pack == p]
        upd = [i for i, t in enumerate(tasks) if t.op is Op.UPD and t.pack == p]
        assert len(reduce) == len(bcast) == len(upd) == 1
        assert bcast[0] == upd[0] + 1 and reduce[0] < upd[0]
    assert not any(t.op is Op.ALLREDUCE for t in tasks)
    g, w = 1 << 10, 3 << 10
    z = [[64] * mbs for _ in range(packs)]
    sizes = Sizes([w] * packs, [g] * packs, [2 * g] * packs, z, z, z, z)
    mine = frozenset({0, 3})
    r = simulate(s, sizes, None, 2, mine)
    assert r.bytes_moved["reduce"] == packs * g and r.bytes_moved["broadcast"] == packs * w
    if wk is Loc.NVME:  # the other ranks' packs: received weights go to their files
        assert r.bytes_moved["host->nvme"] == len(mine) * (w + 2 * g) + (packs - len(mine)) * w
    # a broadcast before the pack's update is refused
    bad = list(tasks)
    i = next(i for i, t in enumerate(bad) if t.op is Op.BROADCAST)
    bad.insert(i - 1, bad.pop(i))
    with pytest.raises(ScheduleError, match=r"broadcasts W\d+ before U\d+"):
        validate(s.with_tasks(bad, s.placement, s.prefetch))
