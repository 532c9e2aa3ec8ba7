"""A model whose training state is twice the machine's memory, trained within 12 GiB.

A decoder (``harmony.tools.builtin_models.Transformer``, Llama-style; 3.37B parameters by default,
50 GiB of fp32 AdamW training state) is built on the meta device, so it never exists whole in
memory: the trainer initializes it one layer at a time straight into its packs' homes (the
device tier, the host tier, or NVMe files) and trains a few steps with ``host_memory="8GiB"``
and ``device_memory="4GiB"`` on the CPU. The script checks the free disk first, and prints:

* the state's size against the machine's memory, the budgets and the plan;
* peak resident memory (RSS) above the baseline against the bound ``1.10 x (host_memory +
  device_memory) + 256 MiB``, and the peaks the tiers accounted;
* time per step, and bytes per link per step;
* step time against max(compute-only, I/O-only) on the same packs. I/O-only replays one
  step's NVMe reads and writes pack by pack with nothing computed. Compute-only cannot hold
  the model in memory, so it is measured on slices of it, the same embedding and head and 1
  and 2 of its blocks, each layer a pack of its own homed on the device tier as the NVMe
  run's packs are, and extrapolated to every block (blocks are identical:
  ``t(1) + (blocks - 1) x (t(2) - t(1))``);

then ``export()`` writes the weights as safetensors shards with their index (Hugging Face's
layout), and a few tensors read back through that index are compared with the trainer's. The
NVMe state and the export are deleted at the end.

    python examples/bench_large.py --nvme-dir /tmp/harmony-nvme           # ~30 min, 2 cores
    python examples/bench_large.py --nvme-dir /mnt/nvme --n-layer 4 --dim 1024   # a quick one
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

try:
    import harmony
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

from harmony.io.weights import WeightFiles
from harmony.model.materialize import default_init
from harmony.planning.refusals import free_bytes
from harmony.planning.sizes import parse_bytes
from harmony.runtime.host_memory import peak_rss_bytes, reset_peak_rss, rss_bytes, trim
from harmony.tools.builtin_models import Transformer, TransformerConfig, _init_weights
from harmony.tools.builtin_models import token_cross_entropy as loss_fn
from schedules.placement import Placement
from schedules.task import Loc
from swap.tier import fmt_bytes

GIB = 1 << 30


def init(layer: torch.nn.Module) -> None:
    """Each module's defaults (norms), then the model's own: N(0, 0.02) linear and
    embedding weights."""
    default_init(layer)
    layer.apply(_init_weights)


def config(args: argparse.Namespace, n_layer: int | None = None) -> TransformerConfig:
    return TransformerConfig(vocab_size=args.vocab, n_layer=n_layer or args.n_layer,
                             dim=args.dim, n_head=args.dim // 128, ffn_hidden=args.ffn,
                             max_seq_len=args.seq_len, style="llama")


def on_meta(cfg: TransformerConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def io_only(trainer: harmony.Trainer) -> float:
    """One step's NVMe traffic replayed pack by pack with nothing computed: each NVMe-homed
    pack's weights read for the forward (if the schedule loads them twice), then from the
    last pack: its weights read for the backward, its weights and optimizer state read for
    the update and written back, one pack's buffers in memory at a time."""
    store, runtime, plan = trainer.store, trainer.runtime, trainer.plan
    assert store is not None and runtime is not None and plan is not None
    packs = [p for p in runtime.packs if p.home is Loc.NVME]
    loads = plan.schedule.weight_loads()

    def files(p: object, kinds: str) -> list[tuple[str, torch.Tensor]]:
        out = []
        for kind in kinds:
            for c in range(len(p.chunks)):  # type: ignore[attr-defined]
                key = p.key(kind, c)  # type: ignore[attr-defined]
                if key in store:
                    out.append((key, torch.empty(store.nbytes(key), dtype=torch.uint8)))
        return out

    def run(ops: list[tuple[str, str, torch.Tensor]]) -> None:
        handles = [store.read(k, b) if op == "r" else store.write(k, b) for op, k, b in ops]
        for h in handles:
            h.synchronize()

    t0 = time.perf_counter()
    for p in packs:
        if loads[p.index] > 1:
            run([("r", k, b) for k, b in files(p, "W")])
    for p in reversed(packs):
        run([("r", k, b) for k, b in files(p, "W")])
        state = files(p, "WK")
        run([("r", k, b) for k, b in state])
        run([("w", k, b) for k, b in state])
    return time.perf_counter() - t0


def compute_only(args: argparse.Namespace,
                 data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Median step seconds of slices with 1 and 2 blocks, every layer a pack homed on the
    device tier (no transfers), built on the meta device as the big model is."""
    out = []
    for blocks in (1, 2):
        model = on_meta(config(args, blocks))
        t = harmony.Trainer(model, loss_fn, micro_batch_size=args.micro_batch_size, init=init,
                            seed=1)
        n = blocks + 2
        bounds = tuple((i, i + 1) for i in range(n))
        t.planner.fixed = (bounds, Placement.uniform(len(bounds), Loc.DEVICE))  # (same packs)
        with t:
            t.step(*data[0])
            times = []
            for x, y in data[1:]:
                t0 = time.perf_counter()
                t.step(x, y)
                times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
        del model, t
        gc.collect()
        trim()
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvme-dir", required=True)
    ap.add_argument("--n-layer", type=int, default=28)
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="the first one profiles and builds")
    ap.add_argument("--host-memory", default="8GiB")
    ap.add_argument("--device-memory", default="4GiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-dir", type=Path, default=None,
                    help="where export() writes (default: NVMe-DIR/export; deleted after)")
    ap.add_argument("--no-compute-only", action="store_true",
                    help="skip the slices that measure compute alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    host, device = parse_bytes(args.host_memory), parse_bytes(args.device_memory)
    assert host is not None and device is not None
    cfg = config(args)
    model = on_meta(cfg)
    params = sum(p.numel() for p in model.parameters())
    w_bytes, state = 4 * params, 16 * params
    ram = psutil.virtual_memory().total
    export_dir = args.export_dir or Path(args.nvme_dir) / "export"
    # The disk must hold the weights and optimizer state that fit in neither budget (the
    # trainer refuses otherwise, with the numbers), and the export.
    need = max(0, 12 * params - host - device) + w_bytes + 2 * GIB
    free = free_bytes(args.nvme_dir)
    print(f"model: {params / 1e9:.2f}B parameters ({cfg.n_layer} blocks x {cfg.dim}, "
          f"vocab {cfg.vocab_size}); fp32 AdamW training state {fmt_bytes(state)} = "
          f"{state / ram:.2f} x this machine's {fmt_bytes(ram)} of memory")
    if free < need:
        print(f"bench_large: {args.nvme_dir} has {fmt_bytes(free)} free; this run needs about "
              f"{fmt_bytes(need)} there (the state beyond the budgets, and the export). Free "
              "space, pick another --nvme-dir, or shrink the model (--n-layer)",
              file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g),
             torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g))
            for _ in range(args.steps)]
    gc.collect()
    trim()
    base = rss_bytes()
    reset_peak_rss()
    bound = int(1.10 * (host + device)) + 256 * (1 << 20)
    t0 = time.perf_counter()
    trainer = harmony.Trainer(model, loss_fn, micro_batch_size=args.micro_batch_size,
                              device="cpu", device_memory=device, host_memory=host,
                              nvme_dir=args.nvme_dir, init=init)
    built = time.perf_counter() - t0
    assert trainer.store is not None
    print(f"budgets: device {fmt_bytes(device)} (the CPU stands in for it), host "
          f"{fmt_bytes(host)}, NVMe at {args.nvme_dir} ({trainer.store.backend}); batch "
          f"{args.batch_size} x {args.seq_len} tokens in micro-batches of "
          f"{args.micro_batch_size}; {args.threads} compute threads; Trainer() {built:.1f} s")
    times, moved, rss_after = [], [], []
    with trainer:
        for i, (x, y) in enumerate(data):
            before = dict(trainer.stats.bytes_moved)
            t0 = time.perf_counter()
            loss = trainer.step(x, y)
            times.append(time.perf_counter() - t0)
            rss_after.append(rss_bytes() - base)
            moved.append({k: v - before.get(k, 0) for k, v in trainer.stats.bytes_moved.items()})
            print(f"step {i}: loss {loss:.4f}, {times[-1]:.1f} s, RSS "
                  f"{fmt_bytes(rss_after[-1])} above the baseline", flush=True)
            if i == 0:
                assert trainer.plan is not None
                print(trainer.plan.describe(trainer.chain.names))
        plan = trainer.plan
        assert plan is not None
        peaks = {loc.value: tier.peak for loc, tier in trainer.tiers.items()}
        peak_train = peak_rss_bytes()
        io = [io_only(trainer) for _ in range(2)]
        # export, and a few tensors read back through the index against the trainer's
        t0 = time.perf_counter()
        out = trainer.export(export_dir)
        exported = time.perf_counter() - t0
        names = ["embed.tok.weight", f"blocks.{cfg.n_layer // 2}.mlp.down.weight",
                 "head.out.weight"]
        files = WeightFiles.open(out)
        same = {k: torch.equal(files.read(k), v)
                for k, v in trainer.state_dict(keys=names).items()}
        shards = sorted(p.name for p in out.iterdir())
        peak_all = peak_rss_bytes()
    shutil.rmtree(export_dir, ignore_errors=True)  # (the NVMe state went with close())
    if args.no_compute_only:
        compute = float("nan")
    else:
        one, two = compute_only(args, data)
        compute = one + (cfg.n_layer - 1) * (two - one)
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    io_s = statistics.median(io)
    homes = plan.placement.w
    on = {loc: sum(1 for h in homes if h is loc) for loc in Loc}
    steps = len(moved) - 1 or 1
    per_link = {k: sum(m.get(k, 0) for m in moved[1:]) / steps for k in moved[-1]}

    print()
    print("| | |")
    print("|---|---|")
    print(f"| model | {params / 1e9:.2f}B parameters, built on the meta device |")
    print(f"| fp32 AdamW training state (W, G, 2 x K) | {fmt_bytes(state)} "
          f"({state / ram:.2f} x the machine's {fmt_bytes(ram)}) |")
    print(f"| budgets | device {fmt_bytes(device)}, host {fmt_bytes(host)}, NVMe |")
    print(f"| plan | {len(plan.bounds)} packs: {on[Loc.DEVICE]} on the device tier, "
          f"{on[Loc.HOST]} on the host, {on[Loc.NVME]} on NVMe"
          + (f"; updates in chunks of {fmt_bytes(plan.update_chunk)}" if plan.update_chunk
             else "") + " |")
    print("| accounted peaks | " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in peaks.items())
          + " |")
    if peak_train is not None and peak_all is not None:
        print(f"| peak RSS above the baseline (training / with export) | "
              f"{fmt_bytes(peak_train - base)} / {fmt_bytes(peak_all - base)}, bound "
              f"{fmt_bytes(bound)} |")
    print(f"| Trainer() | {built:.1f} s |")
    print(f"| first step (profile, plan, initialize into the homes, first update) | "
          f"{times[0]:.1f} s |")
    print(f"| step after the first (median of {len(times) - 1}) | {steady:.1f} s |")
    print(f"| compute only (slices, extrapolated) | {compute:.1f} s |")
    print(f"| I/O only (the step's NVMe traffic, pack by pack) | {io_s:.1f} s |")
    print(f"| step / max(compute, I/O) | {steady / max(compute, io_s):.2f} |")
    print(f"| predicted step (the planner's) | {plan.predicted.step_time or 0.0:.1f} s |")
    print("| bytes per step | " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in
                                             sorted(per_link.items()) if v) + " |")
    print(f"| export() | {exported:.1f} s, {len(shards)} files ({', '.join(shards[:2])}, ...); "
          f"{', '.join(k for k, ok in same.items() if ok)} read back equal |")
    ok = all(same.values()) and (peak_train is None or peak_train - base <= bound)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
