r"""Train a small character-level GPT on tiny Shakespeare with harmony.

The device gets a byte budget smaller than the model's training state (weights, gradients and
AdamW's two moments: 16 bytes per parameter), so harmony must keep that state on the host and
swap packs of layers in and out every step. On a CPU the "device" is CPU memory with a budget,
so the whole path runs (and is measured) on a laptop.

Run from the repository root (after ``pip install -e .``, or with ``PYTHONPATH=.``)::

    python examples/train_gpt.py                        # defaults: ~1-2 min on 2 CPU cores
    python examples/train_gpt.py --steps 20 --eval-every 10 --n-layer 2 --n-embd 64   # smoke
    python examples/train_gpt.py --schedule per-microbatch   # the baseline: more bytes moved
    python examples/train_gpt.py --forward-micro-batch-size 16   # forwards over 4 micro-batches
    mkdir -p /tmp/harmony-nvme && python examples/train_gpt.py --host-memory 4MiB \
        --nvme-dir /tmp/harmony-nvme      # training state 3x the host budget: NVMe files
    python examples/train_gpt.py --host-memory 3MiB --nvme-dir /tmp/harmony-nvme  # chunked
    python examples/train_gpt.py --schedule resident --device-memory 64MiB  # no swapping
    torchrun --standalone --nproc_per_node=1 examples/train_gpt.py --device cuda --precision bf16
    torchrun --standalone --nproc_per_node=1 examples/train_gpt.py
    torchrun --standalone --nproc_per_node=1 examples/train_gpt.py --device cuda --n-layer 8 \
        --n-embd 256 --block-size 128 --batch-size 64 --steps 1000
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --parallel pipeline
        # one stage of packs per process (GPU with --device cuda); rank 0 prints

Data parallelism: with more than one process, every rank runs harmony on its share of each
batch (``--batch-size`` stays the global batch: every rank draws the same batch and trains on
its slice, so N processes reach the weights one process reaches, up to rounding) and the packs'
gradients are all-reduced (gloo on CPU, NCCL on GPUs). Only rank 0 prints::

    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --steps 50   # CPU, gloo
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --steps 50 --shard-optimizer
    torchrun --standalone --nproc_per_node=8 examples/train_gpt.py --device cuda --n-layer 8 \
        --n-embd 256 --block-size 128 --batch-size 64 --steps 1000             # 8 GPUs, NCCL
    # two machines, 8 GPUs each: the same command on both (HOST: the first machine's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=gpt examples/train_gpt.py --device cuda --batch-size 128

The script prints the training-state size against the device budget and harmony's plan after the
first step, shows loss, tokens/s and bytes moved per step while training, evaluates the
validation loss every ``--eval-every`` steps, and ends with the final losses and a sample.

What the defaults give (0.82M parameters, measured on a shared 2-core CPU): a 12.48MiB training
state against a 4.16MiB device budget; a plan of 4 packs (the embedding with the first block,
two blocks, the last block with the head) with W, K and stashed X on the host; val loss 4.19 ->
2.60 (step 50) -> 2.36 (step 200) in 45-110 s; per step 13.5MiB host->device (each pack's
weights for its forward and again for its backward, the last pack's once, plus activations)
and 9.1MiB back. ``--schedule per-microbatch`` reaches the same weights bit for bit, moving
about 4x the bytes (88.7MiB per step). The default budget is a third of the training state (at
least the largest layer's weights and gradients, which one- or two-block models need); when
activations (which grow with micro-batch size, context and dropout) do not fit in it, the script
takes the least budget any plan needs and says so. Arguments that cannot work (a context longer
than the text, a model larger than the memory available, a learning rate that is not positive)
are refused with one line before anything is allocated.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

try:
    import harmony
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

import data_text  # the script's own folder is on sys.path, wherever it is run from
from gpt import GPT, GPTConfig, loss_fn

BYTES_PER_PARAM = 4 * 4  # fp32 weights + gradients + AdamW's exp_avg and exp_avg_sq


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--forward-micro-batch-size", default=None,
                   help="sequences per forward, a multiple of the micro-batch size, or 'auto' "
                        "(default: a forward per micro-batch)")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="sequences each pack runs at a time")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64, help="context length in characters")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (cuda:LOCAL_RANK)")
    p.add_argument("--device-memory", default=None,
                   help="device budget, e.g. '4MiB' or bytes (default: a third of the "
                        "training state, so packs must swap, and at least the largest layer's "
                        "weights and gradients; none for --schedule resident)")
    p.add_argument("--host-memory", default=None, help="host budget (default: no limit)")
    p.add_argument("--nvme-dir", default=None,
                   help="an existing directory for the NVMe tier: with a small --host-memory, "
                        "weights, optimizer state and activations live in files there")
    p.add_argument("--update-chunk", default="auto",
                   help="NVMe packs' updates stream through host memory in chunks of at most "
                        "this many bytes, e.g. '256KiB'; 'none': whole packs; 'auto' "
                        "(default): whole packs if they fit --host-memory, else chunks")
    p.add_argument("--overlap-updates", action="store_true",
                   help="run each pack's optimizer step (its state on the host or NVMe) on a "
                        "worker thread behind the next pack's backward")
    p.add_argument("--schedule", default="harmony",
                   choices=["harmony", "per-microbatch", "resident"])
    p.add_argument("--parallel", choices=["data", "pipeline"], default=None,
                   help="under torchrun: 'data' (the default with several processes) trains "
                        "each rank on a slice of every batch; 'pipeline' each rank on a stage "
                        "of the layers")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="data parallel: each pack's optimizer state on one rank only")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="compute dtype of the weights (bf16/fp16 keep fp32 masters and "
                        "gradients; slow on CPUs without bf16 instructions)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=50, help="steps between val evaluations")
    p.add_argument("--eval-batches", type=int, default=8, help="batches per loss estimate")
    p.add_argument("--sample-chars", type=int, default=200, help="length of the final sample")
    p.add_argument("--plot", default="train_gpt_loss.png",
                   help="write the loss curve to this PNG ('' for none; needs matplotlib)")
    args = p.parse_args(argv)
    if args.forward_micro_batch_size not in (None, "auto"):
        try:
            args.forward_micro_batch_size = int(args.forward_micro_batch_size)
        except ValueError:
            p.error(f"--forward-micro-batch-size {args.forward_micro_batch_size!r}: give a "
                    "number of sequences or 'auto'")
    for name in ("steps", "batch_size", "micro_batch_size", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if not args.lr > 0 or not math.isfinite(args.lr):
        p.error(f"--lr {args.lr:g} must be a positive learning rate, e.g. --lr 1e-3")
    return args


def _available_memory() -> int | None:
    """Bytes of memory the system can give this process now (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


@torch.no_grad()
def estimate_loss(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss of a plain forward over fixed batches (the same ones every time)."""
    return sum(loss_fn(model(x), y).item() for x, y in batches) / len(batches)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)

    # -- processes ------------------------------------------------------------------------------
    # torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `python train_gpt.py` sets none of them.
    # Several processes train data-parallel: harmony joins the process group torchrun's
    # variables describe, and each rank trains on its slice of every batch.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    # Several processes train data-parallel unless --parallel says otherwise.
    parallel = args.parallel or ("data" if world_size > 1 else None)
    if parallel == "data" and args.batch_size < world_size:
        sys.exit(f"train_gpt.py: --batch-size {args.batch_size} leaves some of the "
                 f"{world_size} ranks without samples; use --batch-size >= {world_size}")
    device = f"cuda:{local_rank}" if args.device == "cuda" else args.device
    if rank != 0:  # every rank trains; rank 0 reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        args.plot = ""

    def my_share(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global batch (sizes differ by at most one sample); a
        pipeline rank takes the whole batch."""
        if parallel != "data":
            return x, y
        return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]

    # -- data and model -------------------------------------------------------------------------
    torch.manual_seed(args.seed)  # the model's initial weights
    data = data_text.load()
    try:
        config = GPTConfig(vocab_size=data.vocab_size, block_size=args.block_size,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                           dropout=args.dropout)
    except ValueError as e:
        sys.exit(f"train_gpt.py: {e}")
    shortest = min(len(split) for split in data.splits.values())
    if args.block_size + 1 > shortest:  # (before the position table is allocated)
        sys.exit(f"train_gpt.py: --block-size {args.block_size} is a context of that many "
                 f"characters, but the validation text has {shortest}; use --block-size "
                 f"{shortest - 1} or less (64 is the default)")
    with torch.device("meta"):  # the model's size, without allocating it
        layer_params = [sum(p.numel() for p in layer.parameters())
                        for layer in GPT(config).harmony_chain()]
    n_params = sum(layer_params)
    need = 2 * n_params * 4  # the model and the evaluation copy, fp32
    available = _available_memory()
    if available is not None and need > available:
        sys.exit(f"train_gpt.py: the model has {n_params / 1e6:,.1f}M parameters, whose two "
                 f"fp32 copies (training and evaluation) need {fmt(need)} of memory, and "
                 f"{fmt(available)} is available; use a smaller --n-layer, --n-embd or "
                 "--block-size")
    model = GPT(config)
    # harmony takes over `model`'s parameters (it moves them into its own per-pack buffers and
    # leaves the module's tensors empty), so evaluation and sampling use a second copy built from
    # the same config, refreshed from trainer.state_dict(). It stays on the CPU: the device tier
    # is harmony's, and the eval copy must not eat into its budget.
    eval_model = GPT(config).eval()
    state_bytes = n_params * BYTES_PER_PARAM
    if args.device_memory is not None:
        device_memory = harmony.parse_bytes(args.device_memory, "--device-memory")
    elif args.schedule == "resident":
        device_memory = None  # resident keeps everything on the device: no budget to shrink
    else:
        # Only a third of the state fits, so packs must swap; but never less than the
        # largest layer's weights and gradients (a model of one or two blocks), which any
        # plan must hold on the device at once.
        device_memory = max(state_bytes // 3, max(layer_params) * 4 * 2)
    print(f"GPT: {n_params / 1e6:.2f}M parameters, {config.n_layer} blocks of {config.n_embd} "
          f"channels, vocab {config.vocab_size}, context {config.block_size}")

    # Fixed batches for loss estimates, so successive estimates differ only by the weights.
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [data.get_batch("val", args.batch_size, args.block_size, eval_gen)
                   for _ in range(args.eval_batches)]
    train_batches = [data.get_batch("train", args.batch_size, args.block_size, eval_gen)
                     for _ in range(args.eval_batches)]
    batch_gen = torch.Generator().manual_seed(args.seed)  # the training batches

    def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # harmony calls this once per pack, with that pack's parameters wherever its optimizer
        # state lives (the host when the pack swaps). The fused kernel is faster; it rounds a
        # little differently from torch's default AdamW (harmony.optim.adamw() is the exact one).
        fused = _fused_adamw_supported(params[0].device)
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), fused=fused or None)

    def build_trainer(budget: int | None) -> harmony.Trainer:
        try:
            return harmony.Trainer(model, loss_fn, optimizer=make_optimizer,
                                   micro_batch_size=args.micro_batch_size, device=device,
                                   device_memory=budget, host_memory=args.host_memory,
                                   nvme_dir=args.nvme_dir, schedule=args.schedule,
                                   seed=args.seed, parallel=parallel,
                                   shard_optimizer=args.shard_optimizer,
                                   precision=args.precision,
                                   forward_micro_batch_size=args.forward_micro_batch_size,
                                   overlap_updates=args.overlap_updates,
                                   update_chunk=None if args.update_chunk == "none"
                                   else args.update_chunk)
        except ValueError as e:  # a bad argument, e.g. a budget below one layer's W and G
            sys.exit(f"train_gpt.py: {e}")

    trainer = build_trainer(device_memory)
    eval_model.load_state_dict(trainer.state_dict())  # the initial weights
    first_loss = val_loss = estimate_loss(eval_model, val_batches)
    print(f"step 0: val loss {val_loss:.4f}")

    # -- step 1: harmony profiles every layer on the first micro-batch, then plans ---------------
    # The plan (pack boundaries, where W, G, K and X live, the schedule) is the fastest one the
    # simulator predicts to fit the budgets. A budget no plan fits raises InfeasiblePlan before
    # anything changes, saying what the most frugal plan needs. An explicit --device-memory is
    # the user's word; the default one is a guess (activations, which grow with micro-batch and
    # context, are not in it), so then take the least budget that works.
    x, y = my_share(*data.get_batch("train", args.batch_size, args.block_size, batch_gen))
    try:
        train_loss = trainer.step(x, y)
    except harmony.InfeasiblePlan as e:
        trainer.close()
        if args.device_memory is not None or device_memory is None \
                or e.device_needed <= device_memory:
            sys.exit(f"train_gpt.py: {e}")
        print(f"a third of the training state ({fmt(device_memory)}) leaves no room for the "
              f"activations at --micro-batch-size {args.micro_batch_size}; using "
              f"{fmt(e.device_needed)}, the least any plan needs")
        device_memory = e.device_needed
        trainer = build_trainer(device_memory)
        train_loss = trainer.step(x, y)
    assert trainer.plan is not None
    budget = "no limit" if device_memory is None else fmt(device_memory)
    print(f"training state {fmt(state_bytes)} ({BYTES_PER_PARAM} B/param: weights, gradients, "
          f"AdamW m and v) vs device budget {budget}")
    print("plan: " + trainer.plan.describe(trainer.chain.names))
    peaks = ", ".join(f"{k} {fmt(v)}" for k, v in trainer.stats.peak_bytes.items())
    print(f"step 1: loss {train_loss:.4f}; measured peak {peaks}")
    curve = [(1, train_loss)]  # (step, training loss) for the loss-curve plot
    val_curve = [(0, first_loss)]

    # -- the remaining steps --------------------------------------------------------------------
    tokens_per_step = args.batch_size * args.block_size
    bar = _progress(args.steps, initial=1) if rank == 0 else None
    log = bar.write if bar is not None else print  # print without breaking the bar
    t_start = time.perf_counter()
    with trainer:  # frees harmony's buffers and copy threads however the loop ends
        for step in range(2, args.steps + 1):
            x, y = my_share(*data.get_batch("train", args.batch_size, args.block_size, batch_gen))
            moved_before = sum(trainer.stats.bytes_moved.values())
            t0 = time.perf_counter()
            # One optimizer step: harmony splits x, y into micro-batches of --micro-batch-size,
            # weights each micro-batch's mean loss by its share of the batch (so the gradient
            # equals the full batch's), and returns the batch's mean loss as a float. With
            # several ranks, x and y are this rank's share, the shares are weighed against the
            # global batch, the gradients summed over the ranks, and the loss is the global one.
            train_loss = trainer.step(x, y)
            dt = time.perf_counter() - t0
            curve.append((step, train_loss))
            moved = sum(trainer.stats.bytes_moved.values()) - moved_before

            stats = f"loss {train_loss:.4f}, {tokens_per_step / dt:,.0f} tok/s, moved {fmt(moved)}"
            if bar is not None:
                bar.set_postfix_str(stats, refresh=False)
                bar.update()
            elif step == 2 or step % max(1, args.steps // 20) == 0 or step == args.steps:
                print(f"step {step}/{args.steps}: {stats}")

            if step % args.eval_every == 0 or step == args.steps:
                # trainer.state_dict() gathers the weights from wherever their packs live.
                eval_model.load_state_dict(trainer.state_dict())
                val_loss = estimate_loss(eval_model, val_batches)
                val_curve.append((step, val_loss))
                log(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t_start
        if args.steps == 1:  # the loop did not run: evaluate step 1's weights
            eval_model.load_state_dict(trainer.state_dict())
            val_loss = estimate_loss(eval_model, val_batches)
        moved_total = dict(trainer.stats.bytes_moved)
        peak = dict(trainer.stats.peak_bytes)

    # -- results --------------------------------------------------------------------------------
    final_train = estimate_loss(eval_model, train_batches)
    print(f"final: train loss {final_train:.4f}, val loss {val_loss:.4f} "
          f"(val loss at step 0: {first_loss:.4f})")
    if args.steps > 1:
        print(f"{args.steps - 1} steps after the first in {seconds:.1f}s "
              f"({(args.steps - 1) * tokens_per_step / seconds:,.0f} tok/s)")
    links = ", ".join(f"{k} {fmt(v / args.steps)}" for k, v in sorted(moved_total.items()))
    print(f"bytes moved per step{' (rank 0)' if world_size > 1 else ''}: {links or 'none'}; peak: "
          + ", ".join(f"{k} {fmt(v)}" for k, v in peak.items()))
    prompt = data.encode("\n")[None]  # [1, 1]
    sample = eval_model.generate(prompt, args.sample_chars, temperature=0.8,
                                 generator=torch.Generator().manual_seed(args.seed))
    print("sample:\n" + data.decode(sample[0, 1:]))
    if args.plot and rank == 0:
        _plot(curve, val_curve, args.plot)
    return {"val_loss_start": first_loss, "val_loss": val_loss, "train_loss": final_train}


def _plot(train: list[tuple[int, float]], val: list[tuple[int, float]], path: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no loss curve (pip install matplotlib)")
        return
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(*zip(*train), label="train (batch)", linewidth=0.8)
    ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(path)
    print(f"loss curve written to {path}")


_FUSED: dict[str, bool] = {}


def _fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch build has a fused AdamW kernel for ``device`` (probed once)."""
    if device.type not in _FUSED:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros_like(p)
        try:
            torch.optim.AdamW([p], fused=True).step()
            _FUSED[device.type] = True
        except (RuntimeError, ValueError):
            _FUSED[device.type] = False
    return _FUSED[device.type]


def _progress(steps: int, initial: int):  # -> tqdm | None
    try:
        from tqdm import tqdm
    except ImportError:
        print("tqdm is not installed (pip install tqdm): printing progress every few steps")
        return None
    return tqdm(total=steps, initial=initial, unit="step", dynamic_ncols=True)


if __name__ == "__main__":
    main()
