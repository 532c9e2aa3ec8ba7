"""One command, every contender, side by side: plain PyTorch, harmony (several placements), the
per-micro-batch schedule, and DeepSpeed ZeRO-3 with CPU and NVMe offload.

All run in one process, interleaved on the same batches of the example GPT, so drifts of this
shared machine hit every row alike. Prints median seconds per step (min-max), tokens/s, each
row's ratio to harmony under the same device budget, weight bytes onto the device and storage
bytes (from /proc/self/io) per step, and harmony's peak bytes per tier. A contender that cannot
run gets a row saying why. The device budgets are a third of the training state, or, where a
small model's activations outgrow that, the least any plan needs (a line says so).

    mkdir -p /tmp/harmony-bench && python examples/benchmark.py --nvme-dir /tmp/harmony-bench
    python examples/benchmark.py --nvme-dir /tmp/harmony-bench --scaling   # growth rows

``--scaling`` prints instead how step time and weight bytes grow with model size (2, 4, 8
blocks) and with the number of micro-batches (2, 4, 8, 16), for harmony and the per-micro-batch
schedule under a device budget of a third of the training state (or the least any plan needs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_deepspeed as ds
from bench_common import add_gpt_args, batches, gpt_config, plain_step, stepped
from gpt import GPT, loss_fn

try:
    import harmony
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

from swap.tier import fmt_bytes

Step = Callable[[torch.Tensor, torch.Tensor], object]


def scaling(args: argparse.Namespace) -> None:
    """Step time and weight bytes onto the device against model size and micro-batch count."""
    print("| blocks | micro-batches | schedule | s/step median | weights onto device / step |")
    print("|---|---|---|---|---|")
    cases = [(n, 4) for n in (2, 4, 8)] + [(4, m) for m in (2, 8, 16)]
    for n_layer, micro in cases:
        cfg = gpt_config(args, n_layer)
        state = 16 * GPT(cfg).num_params()
        data = batches(cfg, args.steps + 1, micro * args.micro_batch_size)
        for schedule in ("harmony", "per-microbatch"):
            torch.manual_seed(0)
            t = stepped(lambda b, c=cfg, s=schedule: harmony.Trainer(  # type: ignore[misc]
                GPT(c), loss_fn, micro_batch_size=args.micro_batch_size, device_memory=b,
                schedule=s), state // 3, data[0], f"{n_layer} blocks, {micro} micro-batches, "
                f"{schedule}")
            t.stats.reset()
            ts = []
            for x, y in data[1:]:
                t0 = time.perf_counter()
                t.step(x, y)
                ts.append(time.perf_counter() - t0)
            w = t.stats.kind_bytes("host->device", "W") / args.steps
            print(f"| {n_layer} | {micro} | {schedule} | {statistics.median(ts):.3f} | "
                  f"{fmt_bytes(w)} |")
            t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvme-dir", required=True)
    add_gpt_args(ap, steps=5)
    ap.add_argument("--scaling", action="store_true", help="print the growth rows instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scaling:
        scaling(args)
        return
    cfg = gpt_config(args)
    state = 16 * GPT(cfg).num_params()
    mbs, budget = args.micro_batch_size, state // 3
    data = batches(cfg, args.steps + 1, args.batch_size)
    hdir = Path(args.nvme_dir) / "harmony"
    hdir.mkdir(parents=True, exist_ok=True)

    def trainer(**kw: object) -> harmony.Trainer:
        torch.manual_seed(0)
        return harmony.Trainer(GPT(cfg), loss_fn, micro_batch_size=mbs, **kw)  # type: ignore

    runs: dict[str, Step | str] = {"plain PyTorch": plain_step(cfg, mbs)}
    trainers = {"harmony, everything fits": trainer()}
    failed: dict[str, str] = {}
    budgeted: dict[str, dict[str, object]] = {
        "harmony, device 1/3 of the state": {},
        "per-microbatch, device 1/3": {"schedule": "per-microbatch"},
        "harmony, device 1/3, host 1/3, NVMe": {"host_memory": state // 3, "nvme_dir": hdir}}
    for name, kw in budgeted.items():
        try:  # a third of the state, or the least any plan needs where activations outgrow it
            trainers[name] = stepped(lambda b, kw=kw: trainer(device_memory=b, **kw),
                                     budget, data[0], name)
        except Exception as err:  # a row that says why
            failed[name] = ds.one_line(err)
    for name in ("harmony, everything fits", *budgeted):
        runs[name] = trainers[name].step if name in trainers else failed[name]
    ds_args = argparse.Namespace(batch_size=args.batch_size, micro_batch_size=mbs,
                                 nvme_dir=str(Path(args.nvme_dir) / "deepspeed"),
                                 persistence_threshold=0, max_in_cpu=0)
    Path(ds_args.nvme_dir).mkdir(parents=True, exist_ok=True)
    try:
        ds.init_single_process_dist()
        for device in ("cpu", "nvme"):
            name = f"DeepSpeed ZeRO-3, offload to {device}"
            try:
                runs[name] = ds.deepspeed_run(ds_args, cfg, device)
            except Exception as err:  # a row that says why
                runs[name] = ds.one_line(err)
    except Exception as err:
        runs["DeepSpeed ZeRO-3"] = ds.one_line(err)
    for name, run in list(runs.items()):
        if callable(run):
            try:
                run(*data[0])  # warm-up: harmony plans, DeepSpeed builds its buffers
            except Exception as err:
                runs[name] = ds.one_line(err)
    for t in trainers.values():
        t.stats.reset()
    times: dict[str, list[float]] = {n: [] for n, r in runs.items() if callable(r)}
    storage: dict[str, list[int]] = {n: [0, 0] for n in times}
    for x, y in data[1:]:
        for name in times:
            run = runs[name]
            assert callable(run)
            io0 = ds.disk_io()
            t0 = time.perf_counter()
            run(x, y)
            times[name].append(time.perf_counter() - t0)
            io1 = ds.disk_io()
            storage[name][0] += io1[0] - io0[0]
            storage[name][1] += io1[1] - io0[1]
    steps, tokens = args.steps, args.batch_size * cfg.block_size
    ref_times = times.get("harmony, device 1/3 of the state")  # (None: that row could not run)
    ref = statistics.median(ref_times) if ref_times else None
    print(f"GPT {state / 16 / 1e6:.2f}M parameters, training state {fmt_bytes(state)}, batch "
          f"{args.batch_size} x {cfg.block_size} tokens in micro-batches of {mbs}, "
          f"{args.threads} thread(s), {steps} steps after a warm-up")
    print("| run | s/step median (min-max) | tokens/s | vs harmony at 1/3 | weights onto "
          "device / step | bytes per link / step | storage read / written / step "
          "| peak device / host |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        if not callable(run):
            print(f"| {name} | could not run: {run} | | | | | | |")
            continue
        ts = times[name]
        med = statistics.median(ts)
        t = trainers.get(name)
        w = "-" if t is None else fmt_bytes(t.stats.kind_bytes("host->device", "W") / steps
                                            + t.stats.kind_bytes("nvme->device", "W") / steps)
        peak = "-" if t is None else (f"{fmt_bytes(t.stats.peak_bytes.get('device', 0))} / "
                                      f"{fmt_bytes(t.stats.peak_bytes.get('host', 0))}")
        io = f"{fmt_bytes(storage[name][0] / steps)} / {fmt_bytes(storage[name][1] / steps)}"
        links = "-" if t is None else (", ".join(
            f"{k} {fmt_bytes(v / steps)}" for k, v in sorted(t.stats.bytes_moved.items())) or "0B")
        print(f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {tokens / med:,.0f} | "
              f"{'-' if ref is None else f'{med / ref:.2f}'} | {w} | {links} | {io} | {peak} |")
    for t in trainers.values():
        t.close()


if __name__ == "__main__":
    main()
