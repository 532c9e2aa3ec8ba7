"""DeepSpeed ZeRO-3 with CPU and NVMe offload against plain PyTorch, on this CPU machine.

Runs, interleaved on the same batches in one process (the model and batches of
``bench_overhead.py``): plain PyTorch gradient accumulation, and DeepSpeed ZeRO-3 (single
process, gloo, ``DS_ACCELERATOR=cpu``, fp32, AdamW -> DeepSpeed's CPU Adam) with
``offload_param`` and ``offload_optimizer`` both on ``cpu``, then both on ``nvme``. Prints median
seconds per step (min-max), each row's ratio to plain PyTorch, and storage bytes read and
written per step (from /proc/self/io, which counts the O_DIRECT async I/O of DeepSpeed's
swapper threads; DeepSpeed itself exposes no byte counters). A configuration that cannot run
gets a row with a one-line reason.

    mkdir -p /tmp/ds-nvme && python examples/bench_deepspeed.py --nvme-dir /tmp/ds-nvme --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Both prebuilt ops (async_io, cpu_adam) live here on this machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Step, add_gpt_args, batches, gpt_config, plain_step
from gpt import GPT, GPTConfig, loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without install
from swap.tier import fmt_bytes


def disk_io() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process has caused at the storage layer so far."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def init_single_process_dist() -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")


def ds_config(args: argparse.Namespace, device: str, model: torch.nn.Module) -> dict:
    gas = args.batch_size // args.micro_batch_size
    params = list(model.parameters())
    offload_param: dict = {"device": device, "pin_memory": False}
    offload_opt: dict = {"device": device, "pin_memory": False}
    if device == "nvme":
        # Every parameter tensor needs its own swap buffer (DeepSpeed issue #3062).
        offload_param.update(nvme_path=args.nvme_dir, buffer_count=len(params) + 1,
                             buffer_size=max(p.numel() for p in params),
                             max_in_cpu=args.max_in_cpu)
        offload_opt.update(nvme_path=args.nvme_dir)
    return {
        "train_batch_size": args.batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999],
                                                  "eps": 1e-8, "weight_decay": 0.01}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload_param,
            "offload_optimizer": offload_opt,
            # 0: every parameter is partitioned and offloaded (the default, 1e5 numel, would
            # keep the small ones resident).
            "stage3_param_persistence_threshold": args.persistence_threshold,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def deepspeed_run(args: argparse.Namespace, cfg: GPTConfig, device: str) -> Step:
    import deepspeed

    torch.manual_seed(0)
    model = GPT(cfg)
    if device == "nvme":
        shutil.rmtree(Path(args.nvme_dir) / "zero_stage_3", ignore_errors=True)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(args, device, model))
    mbs = args.micro_batch_size

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            loss = loss_fn(engine(xm), ym)
            engine.backward(loss)  # scaled by 1/gradient_accumulation_steps inside
            engine.step()  # the optimizer steps at the accumulation boundary only
    return step


def one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {msg[:160]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_gpt_args(ap, steps=4)
    ap.add_argument("--nvme-dir", default="/tmp/ds-nvme",
                    help="nvme_path for the NVMe configuration (a directory on local disk)")
    ap.add_argument("--persistence-threshold", type=int, default=0,
                    help="stage3_param_persistence_threshold (DeepSpeed's default is 100000)")
    ap.add_argument("--max-in-cpu", type=int, default=0,
                    help="offload_param max_in_cpu for nvme: parameter elements DeepSpeed keeps in "
                         "host memory (its default, 1e9, keeps this whole model there)")
    args = ap.parse_args()
    assert args.batch_size % args.micro_batch_size == 0
    Path(args.nvme_dir).mkdir(parents=True, exist_ok=True)
    cfg = gpt_config(args)
    data = batches(cfg, args.steps + 1, args.batch_size)
    n_params = GPT(cfg).num_params()
    state = 16 * n_params
    mbs = args.micro_batch_size

    runs: dict[str, Step] = {"plain PyTorch": plain_step(cfg, mbs)}
    failed: dict[str, str] = {}
    names = {"cpu": "ZeRO-3, offload to cpu", "nvme": "ZeRO-3, offload to nvme"}
    try:
        init_single_process_dist()
    except Exception as err:
        failed.update(dict.fromkeys(names.values(), f"init_distributed: {one_line(err)}"))
    for device, name in names.items():
        if name in failed:
            continue
        try:
            runs[name] = deepspeed_run(args, cfg, device)
        except Exception as err:
            failed[name] = f"initialize: {one_line(err)}"
    torch.set_num_threads(args.threads)  # after DeepSpeed, which may change it

    for name, run in list(runs.items()):  # warm-up step
        try:
            run(*data[0])
        except Exception as err:
            failed[name] = f"warm-up step: {one_line(err)}"
            del runs[name]
    times: dict[str, list[float]] = {name: [] for name in runs}
    io_rw: dict[str, list[int]] = {name: [0, 0] for name in runs}
    for x, y in data[1:]:
        for name, run in list(runs.items()):
            r0, w0 = disk_io()
            t0 = time.perf_counter()
            try:
                run(x, y)
            except Exception as err:
                failed[name] = f"step: {one_line(err)}"
                del runs[name]
                continue
            times[name].append(time.perf_counter() - t0)
            r1, w1 = disk_io()
            io_rw[name][0] += r1 - r0
            io_rw[name][1] += w1 - w0

    print(f"GPT {n_params / 1e6:.2f}M parameters, training state {fmt_bytes(state)}, batch "
          f"{args.batch_size} in micro-batches of {mbs}, {args.threads} thread(s), "
          f"{args.steps} steps, nvme_path {args.nvme_dir}")
    print("| run | s/step median (min-max) | vs plain | storage read / written per step |")
    print("|---|---|---|---|")
    base = statistics.median(times["plain PyTorch"]) if times.get("plain PyTorch") else None
    for name in ["plain PyTorch", *names.values()]:
        if name in failed:
            print(f"| {name} | failed: {failed[name]} | - | - |")
            continue
        ts = times[name]
        med = statistics.median(ts)
        ratio = f"{med / base:.2f}" if base else "-"
        r, w = (b / len(ts) for b in io_rw[name])
        rw = "-" if name == "plain PyTorch" else f"{fmt_bytes(r)} / {fmt_bytes(w)}"
        print(f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {ratio} | {rw} |")
    m = args.batch_size // mbs
    est = 16 * n_params + 4 * n_params * m
    print(f"the NVMe estimate, 16P + 4P*M = {fmt_bytes(est)} read per step "
          f"(P={n_params}, M={m}); fp32 master weights + AdamW m, v are 12P = "
          f"{fmt_bytes(12 * n_params)}.")


if __name__ == "__main__":
    main()
