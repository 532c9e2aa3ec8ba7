"""GPU benchmark: harmony beside plain PyTorch and DeepSpeed ZeRO offload, on one decoder model.

One built-in decoder model (``harmony.tools.builtin_models``; default ``gpt2-xl``, 1.64B parameters)
trains with bf16 compute and fp32 master weights and AdamW state, on random tokens:

* **harmony**, with ``device_memory`` a quarter of the training state (``--device-fraction``);
  its host-homed packs step with DeepSpeed's CPU Adam when that op is built, else with
  ``torch.optim.AdamW`` (the report says which);
* **plain PyTorch** (the model and AdamW on the GPU, ``torch.autocast`` to bf16, gradient
  accumulation over the micro-batches), where it fits;
* **DeepSpeed ZeRO-Offload** (stage 2, optimizer state and step on the CPU) and **ZeRO-3**
  (parameters and optimizer offloaded to the CPU), bf16, each block under activation
  checkpointing as ZeRO-offload setups run. DeepSpeed takes no device budget: its live
  parameters and buckets are capped at the budget's share, and its reserved peak is shown
  beside the budget. Skipped, with a line saying why, without DeepSpeed.

Per row: seconds per step (median of the timed steps), tokens/s, model TFLOPS (6 x parameters
x tokens / step time, the usual convention: harmony's recompute is not counted), host<->device
GB/s achieved beside a measured pinned-copy peak, the fraction of copy time hidden behind
compute (1 - stall / busy, from harmony's event-timed statistics), and the allocator's reserved
peak beside the budget. Each row runs in a process of its own (a fresh GPU, a time limit each,
one failing row does not stop the others) and the whole run keeps within ``--time-limit``.

    python examples/bench_gpu.py --report gpu-bench.md                     # on a CUDA machine
    python examples/bench_gpu.py --model gpt-tiny --seq-len 16 --device cpu --steps 1 \\
        --report /tmp/bench.md                                             # the CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import harmony
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

from harmony.model.precision import CHOICES
from harmony.planning.sizes import parse_bytes
from harmony.tools.builtin_models import BUILTINS, build
from swap.tier import fmt_bytes

VARIANTS = ("harmony", "pytorch", "zero-offload", "zero3-offload")
TITLES = {"harmony": "harmony", "pytorch": "plain PyTorch",
          "zero-offload": "DeepSpeed ZeRO-Offload (stage 2, CPU)",
          "zero3-offload": "DeepSpeed ZeRO-3 (params + optimizer on CPU)"}
# Bytes of training state per parameter: W in the compute dtype, G in fp32, K = fp32 masters +
# AdamW's two fp32 moments (harmony/model/precision.py); fp32 training keeps no separate masters.
STATE_PER_PARAM = {"bf16": 2 + 4 + 12, "fp32": 4 + 4 + 8}
VARIANT_CAP_S = {"harmony": 170.0, "pytorch": 80.0, "zero-offload": 120.0,
                 "zero3-offload": 140.0}  # the most one row may take (less if time is short)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's arguments, checked.

    Raises:
        SystemExit: a bad argument, with argparse's message naming it.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-xl", choices=sorted(BUILTINS),
                    help="a built-in decoder (harmony.tools.builtin_models)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps first (harmony's first step profiles and plans)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=sorted(STATE_PER_PARAM))
    ap.add_argument("--device-fraction", type=float, default=0.25,
                    help="device_memory as a fraction of the training state")
    ap.add_argument("--device-memory", default=None,
                    help="device_memory itself (e.g. 8GiB); overrides --device-fraction")
    ap.add_argument("--host-memory", default=None, help="harmony's host_memory (default: none)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated rows to run, of {', '.join(VARIANTS)}")
    ap.add_argument("--report", required=True, help="the markdown file to write")
    ap.add_argument("--time-limit", type=float, default=420.0,
                    help="seconds for the whole benchmark; rows that no longer fit are not run")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="run each row in a process of its own (auto: on CUDA)")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # (a child's row)
    ap.add_argument("--json", help=argparse.SUPPRESS)  # (where a child writes its result)
    args = ap.parse_args(argv)
    for name in ("seq_len", "batch_size", "micro_batch_size", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup={args.warmup} must be >= 0")
    if args.batch_size % args.micro_batch_size:
        ap.error(f"--batch-size={args.batch_size} is not a multiple of --micro-batch-size="
                 f"{args.micro_batch_size}")
    if not 0.0 < args.device_fraction <= 1.0:
        ap.error(f"--device-fraction={args.device_fraction} must be in (0, 1]")
    if args.model in BUILTINS and BUILTINS[args.model].style == "gpt2" and \
            args.seq_len > BUILTINS[args.model].max_seq_len:
        ap.error(f"--seq-len={args.seq_len} is longer than {args.model}'s "
                 f"{BUILTINS[args.model].max_seq_len} positions")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        ap.error(f"--variants={args.variants!r}: choose from {', '.join(VARIANTS)}")
    try:
        args.device_memory_bytes = parse_bytes(args.device_memory, "--device-memory")
        args.host_memory_bytes = parse_bytes(args.host_memory, "--host-memory")
    except ValueError as err:
        ap.error(str(err))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device={args.device} but CUDA is not available; use --device cpu")
    return args


def parameter_count(model: str, seq_len: int) -> int:
    with torch.device("meta"):
        spec = build(model, seq_len)
    return sum(p.numel() for p in spec.model.parameters())


def device_budget(args: argparse.Namespace, params: int) -> int:
    """``--device-memory``, or ``--device-fraction`` of the training state."""
    if args.device_memory_bytes is not None:
        return int(args.device_memory_bytes)
    return int(args.device_fraction * STATE_PER_PARAM[args.precision] * params)


def batches(args: argparse.Namespace, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    vocab = BUILTINS[args.model].vocab_size
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g),
             torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g))
            for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[torch.Tensor, torch.Tensor], float], args: argparse.Namespace,
                device: torch.device, after_warmup: Callable[[], None] | None = None
                ) -> tuple[list[float], list[float]]:
    """(seconds of each timed step, every loss): ``--warmup`` steps, then ``--steps`` timed."""
    data = batches(args, args.warmup + args.steps)
    losses, seconds = [], []
    for i, (x, y) in enumerate(data):
        if i == args.warmup:
            sync(device)
            if after_warmup is not None:
                after_warmup()
        t0 = time.perf_counter()
        losses.append(float(step(x, y)))
        sync(device)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
    return seconds, losses


def reserved_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def cpu_adam_ready() -> bool:
    """Whether DeepSpeed's CPU Adam op is built already (loading it never starts a build)."""
    roots = [os.environ.get("TORCH_EXTENSIONS_DIR"), str(Path.home() / ".cache" /
                                                          "torch_extensions")]
    return any(any(Path(r).glob("**/cpu_adam/cpu_adam*.so")) for r in roots if r)


def _adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


# -- the rows ----------------------------------------------------------------------------------

def run_harmony(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)  # every row starts from the same weights
    spec = build(args.model, args.seq_len)
    optimizer: Callable[..., torch.optim.Optimizer] = _adamw
    adam = "torch.optim.AdamW"
    if device.type == "cuda" and cpu_adam_ready():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        def optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            if params and params[0].device.type == "cpu":  # a host-homed pack's masters
                return DeepSpeedCPUAdam(params, lr=1e-4, adamw_mode=True)
            return _adamw(params)
        adam = "DeepSpeed CPU Adam (host packs)"
    with harmony.Trainer(spec.model, spec.loss_fn, optimizer=optimizer,
                         micro_batch_size=args.micro_batch_size, device=device,
                         device_memory=budget, host_memory=args.host_memory_bytes,
                         precision=args.precision) as t:
        seconds, losses = timed_steps(t.step, args, device, after_warmup=t.stats.reset)
        stats = t.stats
        links = [k for k in stats.busy_seconds if "device" in k]
        busy = sum(stats.busy_seconds[k] for k in links)
        stall = sum(stats.stall_seconds.get(k, 0.0) for k in links)
        moved = sum(stats.bytes_moved.get(k, 0) for k in ("host->device", "device->host"))
        assert t.plan is not None
        return {"seconds": seconds, "losses": losses, "link_bytes": moved / len(seconds),
                "hidden": None if busy <= 0 else max(0.0, 1.0 - stall / busy),
                "reserved": stats.peak_bytes.get("device reserved"),
                "accounted": stats.peak_bytes.get("device"),
                "note": f"{len(t.plan.bounds)} packs; {adam}"}


def run_pytorch(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = build(args.model, args.seq_len)
    try:
        model = spec.model.to(device)
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        dtype = CHOICES[args.precision]
        mbs = args.micro_batch_size

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            total = torch.zeros((), device=device)
            for xm, ym in zip(x.split(mbs), y.split(mbs)):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = spec.loss_fn(model(xm.to(device)), ym.to(device))
                (loss * (xm.shape[0] / x.shape[0])).backward()
                total += loss.detach() * (xm.shape[0] / x.shape[0])
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(total)

        seconds, losses = timed_steps(step, args, device)
    except torch.OutOfMemoryError as err:
        return {"status": "did not fit", "why": one_line(err)}
    return {"seconds": seconds, "losses": losses, "reserved": reserved_peak(device),
            "note": "AdamW fused on the GPU" if device.type == "cuda" else "AdamW"}


def ds_config(args: argparse.Namespace, stage: int, budget: int, cpu_adam: bool
              ) -> dict[str, Any]:
    """DeepSpeed's configuration for a ZeRO offload row (its own schema, nothing harmony's)."""
    element = 2 if args.precision != "fp32" else 4
    zero: dict[str, Any] = {
        "stage": stage,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "contiguous_gradients": True, "overlap_comm": True,
        # Buckets of a quarter of the budget each (DeepSpeed takes no device budget).
        "reduce_bucket_size": budget // 4 // element,
    }
    if stage == 3:
        zero.update({
            "offload_param": {"device": "cpu", "pin_memory": True},
            "stage3_max_live_parameters": budget // 4 // element,
            "stage3_prefetch_bucket_size": budget // 4 // element,
            "stage3_param_persistence_threshold": 0,
        })
    else:
        zero["allgather_bucket_size"] = budget // 4 // element
    config: dict[str, Any] = {
        "train_batch_size": args.batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.batch_size // args.micro_batch_size,
        "bf16": {"enabled": args.precision == "bf16"},
        "fp16": {"enabled": args.precision == "fp16"},
        # Without the CPU Adam op, a torch AdamW (given to deepspeed.initialize) steps on the
        # CPU; DeepSpeed refuses that unless told not to force its own.
        "zero_force_ds_cpu_optimizer": cpu_adam,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cpu_adam:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}
    return config


def run_deepspeed(args: argparse.Namespace, stage: int, budget: int) -> dict[str, Any]:
    try:
        import deepspeed
    except ImportError as err:
        return {"status": "skipped", "why": f"DeepSpeed is not installed ({one_line(err)})"}
    device = torch.device(args.device)
    if device.type != "cuda":
        return {"status": "skipped", "why": "the DeepSpeed rows run on a GPU only"}
    import torch.distributed as dist
    from torch.utils.checkpoint import checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.index is not None:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl")
    cpu_adam = cpu_adam_ready()
    config = ds_config(args, stage, budget, cpu_adam)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        init = deepspeed.zero.Init(config_dict_or_path=config, remote_device="cpu",
                                   pin_memory=True) if stage == 3 else contextlib.nullcontext()
        with init:
            torch.manual_seed(0)
            spec = build(args.model, args.seq_len)
        model = spec.model
        for block in model.blocks:  # activation checkpointing per block
            block.forward = _checkpointed(block.forward, checkpoint)
        client = None if cpu_adam else _adamw(list(model.parameters()))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          optimizer=client, config=config)
    mbs = args.micro_batch_size

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        total = 0.0
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            loss = spec.loss_fn(engine(xm.to(device)), ym.to(device))
            engine.backward(loss)  # (DeepSpeed divides by the accumulation steps)
            engine.step()  # (the optimizer steps at the accumulation boundary only)
            total += float(loss) * xm.shape[0] / x.shape[0]
        return total

    seconds, losses = timed_steps(step, args, device)
    return {"seconds": seconds, "losses": losses, "reserved": reserved_peak(device),
            "note": ("DeepSpeed CPU Adam" if cpu_adam else
                     "torch AdamW on the CPU (CPU Adam op not built)")
            + "; blocks checkpointed"}


def _checkpointed(forward: Callable[..., Any], checkpoint: Callable[..., Any]
                  ) -> Callable[..., Any]:
    def run(*xs: Any) -> Any:
        return checkpoint(forward, *xs, use_reentrant=False)
    return run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {msg[:200]}"


def run_variant(name: str, args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """One row, in this process: its measurements, or a status and why."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if name == "harmony":
            result = run_harmony(args, budget)
        elif name == "pytorch":
            result = run_pytorch(args)
        else:
            result = run_deepspeed(args, 2 if name == "zero-offload" else 3, budget)
    except torch.OutOfMemoryError as err:
        result = {"status": "did not fit", "why": one_line(err)}
    except Exception as err:  # a failing row is reported, not fatal to the others
        result = {"status": "failed", "why": one_line(err), "trace": traceback.format_exc()}
    result.setdefault("status", "ok")
    return result


def run_isolated(name: str, args: argparse.Namespace, argv: list[str], timeout: float
                 ) -> dict[str, Any]:
    """One row in a child process of its own, killed after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", name,
               "--json", str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "why": f"did not finish in {timeout:.0f} s (killed)"}
        if out.exists():
            return dict(json.loads(out.read_text()))
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"status": "failed", "why": f"exit code {done.returncode}: {tail[-300:]}"}


# -- what the report shows ---------------------------------------------------------------------

def pinned_copy_peak(device: torch.device, nbytes: int = 512 << 20) -> dict[str, float] | None:
    """GB/s of the best of three copies each way between pinned host memory and the GPU."""
    if device.type != "cuda":
        return None
    from swap.pinned import PinnedAllocator

    host = PinnedAllocator()(nbytes)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best: dict[str, float] = {}
    for link, (dst, src) in (("host->device", (dev, host)), ("device->host", (host, dev))):
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best[link] = max(best.get(link, 0.0), nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return best


def environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "CUDA": str(torch.version.cuda), "device": str(device)}
    if device.type == "cuda":
        env["GPU"] = torch.cuda.get_device_name(device)
        env["GPU memory"] = fmt_bytes(torch.cuda.get_device_properties(device).total_memory)
    else:
        env["GPU"] = "none (CPU run)"
    try:
        import deepspeed

        env["DeepSpeed"] = deepspeed.__version__
    except ImportError:
        env["DeepSpeed"] = "not installed"
    return env


def summarize(result: dict[str, Any], params: int, tokens: int) -> dict[str, Any]:
    """Derived figures of a finished row: step seconds, tokens/s, TFLOPS, link GB/s."""
    if result.get("status") != "ok":
        return result
    step = statistics.median(result["seconds"])
    result = {**result, "step": step, "tokens_per_s": tokens / step,
              "tflops": 6 * params * tokens / step / 1e12}
    if result.get("link_bytes") is not None:
        result["link_gbs"] = result["link_bytes"] / step / 1e9
    return result


def render(args: argparse.Namespace, env: dict[str, str], params: int, budget: int,
           peak: dict[str, float] | None, rows: dict[str, dict[str, Any]],
           seconds: float) -> str:
    """The benchmark's markdown section."""
    tokens = args.batch_size * args.seq_len
    state = STATE_PER_PARAM[args.precision] * params
    lines = [
        "## GPU benchmark",
        "",
        f"`python examples/bench_gpu.py {' '.join(args.argv)}` ({seconds:.0f} s, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "",
        " | ".join(f"{k}: {v}" for k, v in env.items()),
        "",
        f"Model `{args.model}`: {_count(params)} parameters, sequences of {args.seq_len} "
        f"tokens, batch {args.batch_size} in micro-batches of {args.micro_batch_size} "
        f"({tokens} tokens per step), {args.precision} compute with fp32 masters and AdamW; "
        f"training state {fmt_bytes(state)}; device budget {fmt_bytes(budget)} "
        f"({budget / state:.0%} of it). Pinned-copy peak: "
        + ("-" if peak is None else
           f"{peak['host->device']:.1f} GB/s host->device, {peak['device->host']:.1f} GB/s "
           "device->host") + ".",
        "",
        "| run | s/step | tokens/s | model TFLOPS | host<->device GB/s | copy hidden | "
        "reserved peak / budget | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.variant_list:
        r = rows[name]
        if r.get("status") != "ok":
            lines.append(f"| {TITLES[name]} | {r.get('status')} | | | | | | {r.get('why', '')} |")
            continue
        gbs = "-" if r.get("link_gbs") is None else f"{r['link_gbs']:.1f}"
        hidden = "-" if r.get("hidden") is None else f"{r['hidden']:.0%}"
        reserved = "-" if r.get("reserved") is None else (
            f"{fmt_bytes(r['reserved'])} / {fmt_bytes(budget)}")
        if r.get("accounted") is not None:
            reserved += f" (accounted {fmt_bytes(r['accounted'])})"
        lines.append(f"| {TITLES[name]} | {r['step']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tflops']:.3g} | {gbs} | {hidden} | {reserved} | {r.get('note', '')} |")
    lines += ["", "Losses per step (warm-up first): " + "; ".join(
        f"{TITLES[n]} " + ", ".join(f"{v:.3f}" for v in rows[n]["losses"])
        for n in args.variant_list if rows[n].get("status") == "ok"), ""]
    return "\n".join(lines) + "\n"


def _count(n: float) -> str:
    """``1.638e9`` -> ``'1.638B'``, ``30100`` -> ``'30.1K'``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:.0f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    params = parameter_count(args.model, args.seq_len)
    budget = device_budget(args, params)
    if args.variant is not None:  # a child: one row, its result as JSON
        Path(args.json).write_text(json.dumps(run_variant(args.variant, args, budget)))
        return 0
    t0 = time.perf_counter()
    device = torch.device(args.device)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    env = environment(device)
    peak = pinned_copy_peak(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows: dict[str, dict[str, Any]] = {}
    for name in args.variant_list:
        left = args.time_limit - (time.perf_counter() - t0)
        limit = min(VARIANT_CAP_S[name], left - 5.0)
        if limit < 20.0:
            rows[name] = {"status": "not run", "why": f"{left:.0f} s of --time-limit left"}
        elif isolate:
            rows[name] = run_isolated(name, args, argv, limit)
        else:
            rows[name] = run_variant(name, args, budget)
        rows[name] = summarize(rows[name], params, args.batch_size * args.seq_len)
        print(f"bench_gpu: {name}: {rows[name].get('status')} "
              f"{rows[name].get('why', '')}".rstrip(), flush=True)
    text = render(args, env, params, budget, peak, rows, time.perf_counter() - t0)
    Path(args.report).write_text(text)
    print(text)
    print(f"bench_gpu: report written to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
