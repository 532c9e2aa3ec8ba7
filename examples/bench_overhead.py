"""harmony's overhead against plain PyTorch, when the model fits and when it must swap.

Runs, interleaved on the same batches in one process: plain PyTorch gradient accumulation,
harmony's ``resident`` schedule, ``harmony`` with no budget, and ``harmony`` and
``per-microbatch`` with a device budget of a third of the training state (or the least any plan
needs, where activations outgrow that, as a line says). Prints median seconds
per step (min-max), each row's ratio to plain PyTorch, and weight bytes onto the device.

    python examples/bench_overhead.py                 # the example GPT, ~1 min
    python examples/bench_overhead.py --threads 2 --n-layer 8 --n-embd 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import harmony
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_gpt_args, batches, gpt_config, plain_step, stepped
from gpt import GPT, loss_fn

from swap.tier import fmt_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_gpt_args(ap, steps=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = gpt_config(args)
    data = batches(cfg, args.steps + 1, args.batch_size)
    state = 16 * GPT(cfg).num_params()
    mbs = args.micro_batch_size

    trainers = {
        "harmony, resident": harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs,
                                             schedule="resident"),
        "harmony, no budget": harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs),
    }
    for name, schedule in (("harmony, budget 1/3", "harmony"),
                           ("per-microbatch, budget 1/3", "per-microbatch")):
        trainers[name] = stepped(  # (the least budget that fits, where activations outgrow it)
            lambda b, s=schedule: harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs,
                                                  device_memory=b, schedule=s),
            state // 3, data[0], name)
    runs: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
        "plain PyTorch": plain_step(cfg, mbs)}
    runs.update({name: t.step for name, t in trainers.items()})
    for run in runs.values():
        run(*data[0])  # warm-up: harmony profiles and plans on its first step
    for t in trainers.values():
        t.stats.reset()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for x, y in data[1:]:
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(x, y)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain PyTorch"])
    print(f"GPT {GPT(cfg).num_params() / 1e6:.2f}M parameters, training state "
          f"{fmt_bytes(state)}, batch {args.batch_size} in micro-batches of {mbs}, "
          f"{args.threads} thread(s), {args.steps} steps")
    print("| run | s/step median (min-max) | vs plain | weights onto the device per step "
          "| predicted s/step |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        t = trainers.get(name)
        w = "-" if t is None else fmt_bytes(t.stats.kind_bytes("host->device", "W") / args.steps)
        pred = "-"
        if t is not None and t.plan is not None and t.plan.predicted.step_time is not None:
            pred = f"{t.plan.predicted.step_time:.3f}"
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {med / base:.2f} | {w} "
              f"| {pred} |")
    for t in trainers.values():
        t.close()


if __name__ == "__main__":
    main()
