"""harmony's overhead against plain PyTorch, when the model fits and when it must swap.

Runs, interleaved on the same batches in one process: plain PyTorch gradient accumulation,
harmony's ``resident`` schedule, ``harmony`` with no budget, and ``harmony`` and
``per-microbatch`` with a device budget of a third of the training state. Prints median seconds
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
from gpt import GPT, GPTConfig, loss_fn

from swap.tier import fmt_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(vocab_size=65, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.steps + 1):
        x = torch.randint(0, 65, (args.batch_size, cfg.block_size), generator=g)
        data.append((x, torch.roll(x, -1, dims=1)))
    state = 16 * GPT(cfg).num_params()
    mbs = args.micro_batch_size

    def plain() -> Callable[[torch.Tensor, torch.Tensor], None]:
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            for xm, ym in zip(x.split(mbs), y.split(mbs)):
                (loss_fn(model(xm), ym) * (xm.shape[0] / x.shape[0])).backward()
            opt.step()
            opt.zero_grad()
        return step

    trainers = {
        "harmony, resident": harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs,
                                             schedule="resident"),
        "harmony, no budget": harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs),
        "harmony, budget 1/3": harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs,
                                               device_memory=state // 3),
        "per-microbatch, budget 1/3": harmony.Trainer(
            GPT(cfg), loss_fn, micro_batch_size=mbs, device_memory=state // 3,
            schedule="per-microbatch"),
    }
    runs: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {"plain PyTorch": plain()}
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
