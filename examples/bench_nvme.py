"""How well NVMe transfers hide behind compute: step time with weights and optimizer state on
NVMe, against compute alone and I/O alone.

Three measurements on the same model and batches, interleaved and repeated:

* compute-only: the NVMe run's own packs and schedule (so the same forwards are recomputed)
  with every pack's W, K and X homed on the device tier: the same compute, no transfers;
* one pack: everything on the device tier with no budgets, as the planner picks it then (one
  pack, whose backward runs its forward once: nothing recomputed), for reference;
* NVMe: weights (W) and optimizer state (K) homed in files, device and host budgets below the
  training state (a quarter and a third of it; the device budget raised to the least any plan
  needs where a small model's activations outgrow it, with a line saying so), so every step
  reads W twice, reads W and K for the update and writes them back;
* I/O-only: the same reads and writes, issued in the same order with nothing computed;
* NVMe, overlapped: ``overlap_updates=True`` with the same budgets (planned for them: each
  update on the worker holds its host bytes until joined, so the placement may differ), each
  pack's update streaming on the update worker behind the next pack's backward.

The table reports medians (and min-max) and the ratio step / max(compute, I/O): 1.0 means the
transfers hid completely behind compute (or the compute behind the transfers).

    python examples/bench_nvme.py --nvme-dir /tmp/harmony-bench            # ~3 min on 2 cores
    python examples/bench_nvme.py --nvme-dir /mnt/nvme --n-layer 12 --n-embd 768 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

try:
    import harmony
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import batches, stepped
from gpt import GPT, GPTConfig, loss_fn

from harmony.runtime.pack import Pack
from schedules.placement import Placement
from schedules.task import Loc
from swap.tier import fmt_bytes


def timed_steps(trainer: harmony.Trainer, data: list[tuple[torch.Tensor, torch.Tensor]],
                ) -> list[float]:
    out = []
    for x, y in data:
        t0 = time.perf_counter()
        trainer.step(x, y)
        out.append(time.perf_counter() - t0)
    return out


def io_only(trainer: harmony.Trainer) -> float:
    """Replay one step's NVMe traffic (the plan's weight loads, the update's reads and
    writes of the packs homed on NVMe, chunk by chunk) with no compute, in the order the
    schedule issues it."""
    store, runtime, plan = trainer.store, trainer.runtime, trainer.plan
    assert store is not None and runtime is not None and plan is not None
    packs = [p for p in runtime.packs if p.home is Loc.NVME]  # the others stay on the host
    bufs = {p.index: torch.empty(p.layout.w_bytes, dtype=torch.uint8) for p in packs}
    kbufs = {p.index: torch.empty(p.k_bytes, dtype=torch.uint8) for p in packs}

    def weights(p: Pack) -> list[tuple[str, torch.Tensor]]:
        return [(p.key("W", c.index), bufs[p.index][c.w[0]:c.w[1]]) for c in p.chunks]

    def state(p: Pack) -> list[tuple[str, torch.Tensor]]:
        offsets = [0, *itertools.accumulate(p.k_sizes)]
        return [(p.key("K", c), kbufs[p.index][offsets[c]:offsets[c + 1]])
                for c in range(len(p.chunks)) if p.k_layouts[c] is not None]

    t0 = time.perf_counter()
    handles = []
    loads = plan.schedule.weight_loads()
    for p in packs:  # forward: one load per pack (the backward's second load comes below)
        if loads[p.index] > 1:
            handles += [store.read(key, buf) for key, buf in weights(p)]
    for p in reversed(packs):
        handles += [store.read(key, buf) for key, buf in weights(p)]  # backward
        files = weights(p) + state(p)
        reads = [store.read(key, buf) for key, buf in files]
        for h in reads:  # the update needs its inputs before it can write them back
            h.synchronize()
        handles += [store.write(key, buf) for key, buf in files]
    for h in handles:
        h.synchronize()
    return time.perf_counter() - t0


def contention(trainer: harmony.Trainer, batch: tuple[torch.Tensor, torch.Tensor],
               directory: str) -> tuple[float, float, float, float]:
    """Compute alone, compute while a thread streams NVMe reads, and the read GB/s with and
    without the compute: how much the two slow each other down on this machine."""
    from swap.nvme import NvmeStore

    def steps(n: int = 3) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.step(*batch)
        return (time.perf_counter() - t0) / n

    alone = steps()
    with NvmeStore(directory) as store:
        buf = store.allocate(64 << 20)
        store.write("probe", buf).synchronize()
        stop, moved = threading.Event(), [0]

        def reads() -> None:
            while not stop.is_set():
                store.read("probe", buf).synchronize()
                moved[0] += buf.numel()

        worker = threading.Thread(target=reads)
        t0 = time.perf_counter()
        worker.start()
        busy = steps()
        stop.set()
        worker.join()
        shared_gbs = moved[0] / (time.perf_counter() - t0) / 1e9
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            store.read("probe", buf).synchronize()
            n += buf.numel()
        alone_gbs = n / (time.perf_counter() - t0) / 1e9
    return alone, busy, alone_gbs, shared_gbs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvme-dir", required=True)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's compute threads (default: torch's own choice); fewer leave "
                         "cores to the I/O and copy threads, as a GPU server's compute does")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = GPTConfig(vocab_size=65, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    n_params = GPT(cfg).num_params()
    state = 16 * n_params
    data = batches(cfg, args.repeats + 1, args.batch_size)

    def make(**kw: object) -> harmony.Trainer:
        return harmony.Trainer(GPT(cfg), loss_fn, optimizer=harmony.optim.adamw(lr=1e-4),
                               micro_batch_size=args.micro_batch_size, **kw)  # type: ignore[arg-type]

    def on_device(plan: harmony.Plan) -> harmony.Plan:
        """``plan``'s packs and schedule with every home on the device tier."""
        homes = Placement.uniform(len(plan.bounds), Loc.DEVICE)
        return dataclasses.replace(plan, schedule=dataclasses.replace(plan.schedule,
                                                                      placement=homes))

    print(f"model: {n_params / 1e6:.1f}M parameters, training state {fmt_bytes(state)}; "
          f"NVMe run: device {fmt_bytes(state // 4)}, host {fmt_bytes(state // 3)}; "
          f"batch {args.batch_size} x {args.block_size} tokens, micro-batch "
          f"{args.micro_batch_size}; {torch.get_num_threads()} compute threads")
    def on_nvme(name: str, **kw: object) -> harmony.Trainer:
        """The budgets' trainer after its warm-up step (it plans, builds packs, creates the
        first optimizer state); the least device budget any plan needs where a small
        model's activations outgrow a quarter of its state."""
        return stepped(lambda b: make(device_memory=b, host_memory=state // 3,
                                      nvme_dir=args.nvme_dir, **kw), state // 4, data[0], name)

    with on_nvme("NVMe run") as nvme, make() as one_pack:
        one_pack.step(*data[0])
        assert nvme.plan is not None and nvme.store is not None
        print(nvme.plan.describe(nvme.chain.names))
        print(f"NVMe backend: {nvme.store.backend}")
        compute = make(plan=on_device(nvme.plan))
        compute.step(*data[0])
        behind = on_nvme("NVMe run, overlap_updates=True", overlap_updates=True)
        assert behind.plan is not None
        print("overlap_updates=True, planned for the same budgets:")
        print(behind.plan.describe(behind.chain.names))
        nvme.stats.reset()
        c_times, n_times, io_times, o_times, b_times = [], [], [], [], []
        for batch in data[1:]:  # interleaved, so drifts of the shared disk hit every row
            c_times += timed_steps(compute, [batch])
            n_times += timed_steps(nvme, [batch])
            io_times.append(io_only(nvme))
            o_times += timed_steps(one_pack, [batch])
            b_times += timed_steps(behind, [batch])
        overlapped = "on the update worker" if behind.plan.overlap_updates else \
            "in line: the host budget leaves no room to overlap them"
        b_predicted = behind.plan.predicted.step_time or 0.0
        b_peak = behind.stats.peak_bytes.get("host", 0)
        behind.close()
        steps = len(n_times)
        predicted = nvme.plan.predicted.step_time or 0.0
        c_alone, c_busy, r_alone, r_busy = contention(compute, data[1], args.nvme_dir)
        compute.close()
        per_link = {k: v / steps for k, v in sorted(nvme.stats.bytes_moved.items())}
        stall = {k: v / steps for k, v in sorted(nvme.stats.stall_seconds.items()) if v > 0}

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):7.3f} s ({min(xs):.3f}-{max(xs):.3f})"

    c, n, io = (statistics.median(x) for x in (c_times, n_times, io_times))
    print()
    print("| measurement | median (min-max) |")
    print("|---|---|")
    print(f"| compute only (the same packs, all homed on the device tier) | {fmt(c_times)} |")
    print(f"| I/O only (the step's NVMe reads and writes) | {fmt(io_times)} |")
    print(f"| step with W and K on NVMe | {fmt(n_times)} |")
    print(f"| step / max(compute, I/O) | {n / max(c, io):.2f} |")
    print(f"| step time the planner predicted (CPU profile, assumed NVMe bandwidth) | "
          f"{predicted:7.3f} s |")
    print(f"| step with W and K on NVMe, overlap_updates=True (updates {overlapped}) | "
          f"{fmt(b_times)} |")
    print(f"| that step / max(compute, I/O) | {statistics.median(b_times) / max(c, io):.2f} |")
    print(f"| step time the planner predicted with overlap_updates=True | "
          f"{b_predicted:7.3f} s |")
    print(f"| for reference: one pack on the device tier, nothing recomputed | "
          f"{fmt(o_times)} |")
    print()
    print("bytes per step: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in per_link.items()))
    print("stall per step: " + (", ".join(f"{k} {v:.3f} s" for k, v in stall.items()) or "none"))
    print(f"host peak with overlap_updates=True: {fmt_bytes(b_peak)} of "
          f"{fmt_bytes(state // 3)}")
    print(f"contention: compute-only step {c_alone:.3f} s alone, {c_busy:.3f} s while a thread "
          f"streams NVMe reads; reads {r_alone:.2f} GB/s alone, {r_busy:.2f} GB/s meanwhile")


if __name__ == "__main__":
    main()
