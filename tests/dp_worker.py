"""One rank of a data-parallel test run (tests/parallel/test_data_parallel.py forks two of these;
from the repository root ``torchrun --nproc_per_node=2 -m tests.dp_worker --out DIR`` runs it too).

The test sets torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK,
LOCAL_WORLD_SIZE), so the trainer initializes the gloo group itself, as under torchrun. Each
step's global batch is drawn from a seeded generator and the rank trains on its slice of it
(``--shards 4,4``: rank 0 the first 4 samples, rank 1 the next 4). The rank saves what the
test compares to ``OUT/rank{r}.pt``: final weights, losses, the last step's bytes per link and
the plan's prediction of them.

``--fail-at S``: rank 1 raises inside a layer's forward during step S, reports the time on
stdout, waits ``--linger`` seconds (a rank that does not exit at once) and re-raises.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import harmony
from harmony.tools.report import plan_to_json
from schedules.task import Loc
from tests import copier
from tests.models import MODELS as SHARED_MODELS
from tests.models import cross_entropy_tokens, tied_transformer, training_state_bytes
from tests.timing import fix_timing

# The shared test models, and a transformer whose head is tied to its token embedding (kept
# out of tests/models.MODELS: tied gradients are summed in another order than plain autograd's,
# so the bit-for-bit equivalence tests cover them separately).
MODELS = {**SHARED_MODELS, "tied": (
    tied_transformer, cross_entropy_tokens,
    lambda n, g: (torch.randint(0, 11, (n, 8), generator=g),
                  torch.randint(0, 11, (n, 8), generator=g)))}

OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 4),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 8),
}


def global_batches(model: str, n: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [MODELS[model][2](n, g) for _ in range(steps)]


def make_trainer(args: argparse.Namespace, parallel: str | None) -> harmony.Trainer:
    factory, loss_fn, _ = MODELS[args.model]
    opt, state = OPTIMIZERS[args.opt]
    total = training_state_bytes(factory(0.0), state)
    budget = total // 2 if args.swap or args.nvme else None
    nvme = None
    if args.nvme:  # half the packs' weights and optimizer state in NVMe files
        nvme = Path(args.out) / f"nvme-{os.environ.get('RANK', 'one')}"
        nvme.mkdir(parents=True, exist_ok=True)
    return harmony.Trainer(factory(args.dropout), loss_fn, optimizer=opt,
                           micro_batch_size=args.mbs, device_memory=budget,
                           host_memory=total // 2 if args.nvme else None,
                           nvme_dir=None if nvme is None else str(nvme),
                           clip_grad_norm=args.clip, schedule=args.schedule, parallel=parallel,
                           nonfinite=args.nonfinite, precision=args.precision,
                           shard_optimizer=args.shard and parallel == "data",
                           forward_micro_batch_size=args.forward, plan=args.plan,
                           update_chunk=args.update_chunk)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="transformer")
    p.add_argument("--opt", default="sgd")
    p.add_argument("--schedule", default="harmony")
    p.add_argument("--shards", default="4,4")
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--swap", action="store_true")
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--fail-at", type=int, default=None)
    p.add_argument("--linger", type=float, default=0.0)
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument("--nvme", action="store_true")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--nonfinite", default="raise")
    p.add_argument("--shard", action="store_true", help="shard_optimizer=True")
    p.add_argument("--forward", type=int, default=None, help="forward_micro_batch_size")
    p.add_argument("--plan", default=None,
                   help="a plan JSON to keep (a run compared pack by pack with another)")
    p.add_argument("--update-chunk", default="auto",
                   help="update_chunk= (e.g. 16KiB: NVMe packs' updates in chunks)")
    p.add_argument("--more", type=int, default=0,
                   help="steps after the checkpoint, by the trainer and by one loading it")
    p.add_argument("--nan-at", type=int, default=None,
                   help="rank 1's loss is NaN in this step (of the batches)")
    return p.parse_args(argv)


def fork_ranks(target: Callable[..., None], args: tuple[Any, ...], logs: Path, world: int = 2,
               timeout: float = 60.0, env: dict[str, str] | None = None) -> list[int | None]:
    """Run ``target(rank, *args)`` in ``world`` child processes set up as torchrun would set
    them up (stdout and stderr to ``logs/log{rank}``); returns their exit codes, None for a
    child killed at the ``timeout`` (seconds, for all of them together).

    The children come from a fork server that imported torch and harmony once and runs no
    threads (forking the test process itself would copy its copy threads' and OpenMP's locks
    in whatever state they are); ``target`` must be a module-level function."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "harmony", "tests.dp_worker"])
    procs = [ctx.Process(target=_child, args=(r, world, port, logs, env or {}, target, args),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def _child(rank: int, world: int, port: int, logs: Path, env: dict[str, str],
           target: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
    os.environ.setdefault("HARMONY_DIST_TIMEOUT", "20")
    torch.set_num_threads(1)  # the ranks share the cores
    log = open(logs / f"log{rank}", "w", buffering=1)  # noqa: SIM115 (lives with the process)
    sys.stdout = sys.stderr = log
    target(rank, *args)


def run_rank(rank: int, argv: list[str]) -> None:
    """:func:`main` as a :func:`fork_ranks` target."""
    main(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # Runs that the tests compare pack by pack must build the same packs whatever the load.
    fix_timing()
    rank = int(os.environ["RANK"])
    shards = [int(s) for s in args.shards.split(",")]
    start = sum(shards[:rank])
    batches = global_batches(args.model, sum(shards), args.steps + args.more)
    extra, batches = batches[args.steps:], batches[:args.steps]
    mine = slice(start, start + shards[rank])
    trainer = make_trainer(args, "data")
    if args.fail_at is not None and rank == 1:
        def boom(module: torch.nn.Module, inputs: object) -> None:
            if trainer.step_count == args.fail_at:
                print(f"RAISED {time.time()}", flush=True)
                raise RuntimeError("injected failure on rank 1")
        trainer.chain.layers[1].register_forward_pre_hook(boom)
    if args.hang_at is not None and rank == 1:
        hung: list[bool] = []

        def hang(module: torch.nn.Module, inputs: object) -> None:
            if trainer.step_count == args.hang_at and not hung:
                hung.append(True)
                print(f"HUNG {time.time()}", flush=True)
                time.sleep(args.linger)
        trainer.chain.layers[1].register_forward_pre_hook(hang)
    if args.nan_at is not None and rank == 1:
        def poison(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> object:
            return output * float("nan") if batch_index[0] == args.nan_at else None
        trainer.chain.layers[1].register_forward_hook(poison)
    losses = []
    before: dict[str, int] = {}
    batch_index = [0]
    try:
        for batch_index[0], (x, y) in enumerate(batches):
            before = dict(trainer.stats.bytes_moved)
            losses.append(trainer.step(x[mine], y[mine]))
    except Exception as err:
        print(f"FAILED {time.time()} {type(err).__name__}: {err}", flush=True)
        if rank == 1:  # a failed rank that does not exit at once
            time.sleep(args.linger)
        trainer.close()
        print(f"CLOSED {time.time()}", flush=True)
        raise
    assert trainer.plan is not None
    last = {k: v - before.get(k, 0) for k, v in trainer.stats.bytes_moved.items()}
    assert trainer.runtime is not None
    packs = trainer.runtime.packs
    shard = {  # what each rank holds of the optimizer
        "owners": trainer.plan.owners,
        "k_charged": [p.k_charged for p in packs],
        "k_real": [sum(t.numel() * t.element_size() for s in p.optimizer.state.values()
                       for t in s.values() if isinstance(t, torch.Tensor)) for p in packs],
        "trains": [bool(p.optimizer.param_groups) for p in packs],
        "k_planned": list(trainer.plan.sizes.k),
        "host_peak_predicted": trainer.plan.predicted.peak.get(Loc.HOST, 0),
        "homes": [p.home.value for p in packs],
        "masters": [p.home_m is not None for p in packs],
        "chunks": [len(p.chunks) for p in packs]}
    ckpt = trainer.save(Path(args.out) / "ckpt")
    with make_trainer(args, "data") as fresh:
        fresh.load(ckpt)
        loaded = fresh.state_dict()
        loaded_steps = fresh.step_count
        # training goes on alike in the trainer that saved and the one that loaded
        for x, y in extra:
            trainer.step(x[mine], y[mine])
        for x, y in extra:
            fresh.step(x[mine], y[mine])
        more = fresh.state_dict()
    if rank == 0:  # for a run that must build the same packs
        (Path(args.out) / "plan.json").write_text(json.dumps(plan_to_json(trainer.plan)))
    torch.save({"state": trainer.state_dict(), "losses": losses, "bytes": last,
                "predicted": dict(trainer.plan.predicted.bytes_moved),
                "g_bytes": sum(trainer.plan.sizes.g), "w_bytes": sum(trainer.plan.sizes.w),
                "packs": len(trainer.plan.bounds), "loaded": loaded, "loaded_steps": loaded_steps,
                "shard": shard, "more": more, "ckpt": str(ckpt),
                "skipped": trainer.stats.skipped_steps, "steps": trainer.step_count,
                "nvme": "nvme" in {loc.value for loc in trainer.plan.placement.w},
                "copier": copier.used(trainer),
                "schedule": str(trainer.plan.schedule)},
               Path(args.out) / f"rank{rank}.pt")
    trainer.close()


if __name__ == "__main__":
    main()
