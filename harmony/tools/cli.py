"""The ``harmony`` command line.

``harmony report MODEL ...`` prints the per-layer memory and time table, the plan the planner
chooses for the budgets, the predicted peak per tier, bytes per link per step beside the
per-micro-batch baseline and the traffic arithmetic (docs/design.md), and the predicted step time;
it can write the plan as JSON and plot bytes per tier over the step. Nothing is allocated:
models are built on the meta device. See ``docs/report.md``.

    harmony report llama-70b --batch-size 8 --micro-batch-size 1 --seq-len 4096 \\
        --device-memory 80GiB --host-memory 1TiB
    harmony report paper:gpt2_10b --batch-size 32 --micro-batch-size 4 \\
        --device-memory 10GiB --host-memory 256GiB --json plan.json --plot plan.png
    harmony report paper:gpt2_medium --batch-size 32 --micro-batch-size 1 \\
        --forward-micro-batch-size auto --device-memory 10GiB --host-memory 256GiB
    python -m harmony report my_model.py:build --seq-len 512 --device-memory 16GiB

``harmony env [--nvme-dir DIR] [--build-aio]`` prints what this machine gives harmony
(:mod:`harmony.tools.env`).

Exit status: 0 on success; 1 when ``--plot`` cannot draw (matplotlib missing) or
``--build-aio`` cannot build; 2 for a bad argument, an output path that cannot be written, more
than :data:`harmony.tools.report.MAX_MICRO_BATCHES` micro-batches per step, or an infeasible plan
(one line saying what to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harmony.planning.chunks import parse_update_chunk
from harmony.planning.groups import forward_group_of
from harmony.planning.meta import CPU_FLOPS, GPU_FLOPS
from harmony.planning.planner import InfeasiblePlan
from harmony.planning.sizes import parse_bytes
from harmony.tools.builtin_models import BUILTINS
from harmony.tools.paper_profiles import PAPER_MODELS
from harmony.tools.profiles import load_profile, measure_profile
from harmony.tools.report import (
    LINKS,
    PlotUnavailable,
    check_micro_batches,
    format_report,
    make_report,
    plot_report,
    report_to_json,
)
from schedules.generators import GENERATORS

_MODEL_HELP = f"""\
what to plan:
  a built-in name: {", ".join(BUILTINS)}
  paper:NAME, the Harmony paper's GTX 1080 Ti profiles: {", ".join(PAPER_MODELS)}
  path/to/file.py:function returning (model, loss_fn, example_inputs), where
      example_inputs(n) -> (inputs, targets) for n samples; called under
      torch.device("meta") with seq_len=T when --seq-len is given
  a .json profile written by --run (or a report written by --json)"""


def _bandwidth(text: str) -> tuple[str, float]:
    name, sep, rate = text.partition("=")
    # "host-device" reads the same as "host->device" and needs no quoting in a shell.
    name = name.strip().replace("->", "-").replace("-", "->")
    if not sep or name not in LINKS:
        raise argparse.ArgumentTypeError(
            f"--bandwidth {text!r}: write LINK=RATE with LINK one of {', '.join(LINKS)} "
            "(quote the '>' in a shell, or write host-device), e.g. host-device=11.5GiB")
    rate = rate.strip().removesuffix("/s")
    try:
        value = parse_bytes(rate, f"--bandwidth {name}")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not value:
        raise argparse.ArgumentTypeError(f"--bandwidth {text!r}: the rate must be positive")
    return name, float(value)


def _size(flag: str) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if text.lower() in ("none", "unlimited"):
            return None
        try:
            return parse_bytes(text, flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _chunk(text: str) -> int | str | None:
    try:
        return parse_update_chunk(None if text.lower() == "none" else text, "--update-chunk")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _flops(text: str) -> float:
    named = {"gpu": GPU_FLOPS, "cpu": CPU_FLOPS}
    try:
        value = named[text.lower()] if text.lower() in named else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--device-flops {text!r}: give FLOP/s such as 100e12, "
                                          "or 'gpu' / 'cpu'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--device-flops {text!r} must be positive")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _forward(text: str) -> int | str:
    return "auto" if text.lower() == "auto" else _positive(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmony", description="harmony: train PyTorch "
                                     "models larger than device memory on one server")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="plan a model for given budgets and show what it holds, moves and takes",
        description="Plan MODEL for the budgets and print the per-layer table, the plan, the "
                    "predicted peak per tier, bytes per link per step (beside the "
                    "per-micro-batch baseline and the traffic arithmetic) and the step time. "
                    "Nothing is allocated: models are profiled on the meta device.",
        epilog=_MODEL_HELP)
    rep.add_argument("model", metavar="MODEL", nargs="?", default=None,
                     help="see below (not needed with --run)")
    rep.add_argument("--batch-size", type=_positive, default=8, metavar="N",
                     help="samples per optimizer step (default 8)")
    rep.add_argument("--micro-batch-size", type=_positive, default=1, metavar="U",
                     help="samples per micro-batch (default 1)")
    rep.add_argument("--forward-micro-batch-size", type=_forward, default=None, metavar="F",
                     help="samples per forward, a multiple of U: packs whose layers allow it "
                          "run one forward over F / U micro-batches (harmony schedule); "
                          "'auto': the planner chooses (default: a forward per micro-batch)")
    rep.add_argument("--seq-len", type=_positive, default=None, metavar="T",
                     help="tokens per sample (default: the model's longest)")
    rep.add_argument("--device-memory", type=_size("--device-memory"), default=None,
                     metavar="SIZE", help="device budget, e.g. 16GiB (default: no limit)")
    rep.add_argument("--host-memory", type=_size("--host-memory"), default=None,
                     metavar="SIZE", help="host budget, e.g. 64GiB (default: no limit)")
    rep.add_argument("--nvme-dir", default=None, metavar="DIR",
                     help="allow NVMe placements (the directory is not touched)")
    rep.add_argument("--schedule", choices=sorted(GENERATORS), default="harmony")
    rep.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                     help="W and activations in this dtype (bf16/fp16: fp32 gradients, and "
                          "K holds fp32 master weights besides the optimizer state)")
    rep.add_argument("--lora", type=_positive, default=None, metavar="R",
                     help="add LoRA adapters of rank R to every linear layer of the blocks and "
                          "freeze the rest (needs peft): frozen weights count as W only")
    rep.add_argument("--update-chunk", type=_chunk, default="auto", metavar="SIZE",
                     help="stream the updates of NVMe-homed packs through host memory in "
                          "chunks of at most SIZE of weights and optimizer state, 'none' for "
                          "whole packs, or 'auto' (default: whole packs if they fit the host "
                          "budget, else the largest chunks that do)")
    rep.add_argument("--overlap-updates", action="store_true",
                     help="plan the optimizer steps of packs homed on the host or NVMe on a "
                          "worker thread, "
                          "behind the next pack's backward (Trainer(overlap_updates=True))")
    rep.add_argument("--prefetch", type=int, default=None, metavar="K",
                     help="force a prefetch depth (default: the planner's choice)")
    rep.add_argument("--bandwidth", type=_bandwidth, action="append", default=[],
                     metavar="LINK=RATE",
                     help="bytes/s of a link, repeatable, e.g. host-device=11.5GiB or "
                          "'host->device=11.5GiB' (default 11.5GiB each way between host "
                          "and device; NVMe links 2.0GB read, 1.5GB write)")
    rep.add_argument("--device-flops", type=_flops, default=GPU_FLOPS, metavar="FLOPS",
                     help="sustained FLOP/s for meta-device time estimates: a number, 'gpu' "
                          f"({GPU_FLOPS:.3g}) or 'cpu' ({CPU_FLOPS:.3g}); default gpu")
    rep.add_argument("--update-rate", type=_size("--update-rate"), default=None,
                     metavar="RATE", help="gradient bytes/s the optimizer update processes "
                     "(default: the profile's, 1GB for estimates)")
    rep.add_argument("--json", type=Path, default=None, metavar="OUT.json",
                     help="write the plan, its prediction and the profile as JSON")
    rep.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                     help="plot bytes per tier over the step (needs matplotlib)")
    rep.add_argument("--measure-layers", type=Path, default=None, metavar="PROFILE.json",
                     help="measure the layers by running the model for real on the CPU "
                          "(allocates it) instead of estimating, and save that profile")
    rep.add_argument("--run", type=Path, default=None, metavar="STEP.json",
                     help="a step a Trainer recorded (Trainer.record_step): show what "
                          "happened next to what its plan predicted; MODEL is then not needed")
    env = sub.add_parser(
        "env", help="what this machine gives harmony: torch, CUDA, GPUs, pinned memory, "
                    "NVMe backends, CPU Adam, budgets",
        description="Print torch and CUDA versions, GPUs, whether pinned memory works, each "
                    "NVMe backend's availability (and O_DIRECT in --nvme-dir), DeepSpeed's CPU "
                    "Adam op, host memory and the budgets' defaults. Builds nothing unless "
                    "--build-aio.")
    env.add_argument("--nvme-dir", default=None, metavar="DIR",
                     help="probe O_DIRECT with a test block written in a temporary "
                          "directory there")
    env.add_argument("--build-aio", action="store_true",
                     help="build DeepSpeed's async I/O op for the NVMe store (may take "
                          "several minutes; needs libaio-dev)")
    return parser


def _writable(path: Path | None, flag: str) -> None:
    """Refuse an output path the report could not write, before any work.

    Raises:
        ValueError: naming the flag, the path and why.
    """
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    why = ("is a directory; give a file name inside it" if path.is_dir()
           else f"is in {parent}, which does not exist" if not parent.is_dir()
           else None)
    if why is None and not os.access(parent, os.W_OK | os.X_OK):
        why = (f"is in {parent}, on a read-only file system (Read-only)"
               if _read_only(parent) else f"is in {parent}, which is not writable")
    if why is None and path.exists() and not os.access(path, os.W_OK):
        why = "exists and is not writable"
    if why is not None:
        raise ValueError(f"{flag} {path} {why}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _env(args: argparse.Namespace) -> int:
    from harmony.tools.env import build_aio, report
    from swap.aio import AioUnavailable

    if args.build_aio:
        try:
            print(build_aio())
        except AioUnavailable as err:
            print(f"harmony env: cannot build the async I/O op: {err}", file=sys.stderr)
            return 1
    print(report(args.nvme_dir))
    return 0


def _report(args: argparse.Namespace) -> int:
    for path, flag in ((args.json, "--json"), (args.plot, "--plot"),
                       (args.measure_layers, "--measure-layers")):
        _writable(path, flag)  # before any work: ValueError, one line and exit 2
    if args.run is not None:
        from harmony.tools.measured import format_measured, load_measured, plot_measured

        step = load_measured(args.run)
        print(format_measured(step))
        return _plot(lambda: plot_measured(step, args.plot), args.plot)
    if args.model is None:
        raise ValueError("MODEL is required (a built-in name, paper:NAME, file.py:function or "
                         "a profile .json; see harmony report --help), unless --run STEP.json "
                         "shows a recorded step")
    check_micro_batches(args.batch_size, args.micro_batch_size)  # before building the model
    if args.measure_layers is not None:
        profile = measure_profile(args.model, args.micro_batch_size, args.seq_len,
                                  args.precision, args.lora)
        args.measure_layers.write_text(json.dumps(profile.to_json(), indent=1))
    else:
        profile = load_profile(args.model, args.micro_batch_size, args.seq_len,
                               args.device_flops, args.precision, args.lora)
    if args.update_rate:
        profile.upd_s_per_byte = 1.0 / args.update_rate
    group = forward_group_of(args.forward_micro_batch_size, args.micro_batch_size,
                             args.schedule, None)  # ValueError naming the fix
    try:
        report = make_report(profile, args.batch_size, args.device_memory, args.host_memory,
                             nvme=args.nvme_dir is not None, schedule=args.schedule,
                             bandwidth=dict(args.bandwidth), prefetch=args.prefetch,
                             forward_group=group,

                             update_chunk=args.update_chunk,
                             overlap_updates=args.overlap_updates)
    except InfeasiblePlan as err:
        print(f"harmony report: no plan fits: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.nvme_dir is not None and not Path(args.nvme_dir).is_dir():
        print(f"note: --nvme-dir {args.nvme_dir} does not exist; the report only plans for "
              "it (a Trainer needs an existing, writable directory)")
    if args.measure_layers is not None:
        print(f"\nmeasured profile written to {args.measure_layers}")
    if args.json is not None:
        args.json.write_text(json.dumps(report_to_json(report)))
        print(f"plan written to {args.json}")
    return _plot(lambda: plot_report(report, args.plot), args.plot)


def _plot(draw: Callable[[], None], path: Path | None) -> int:
    """Draw to ``path`` if one was asked for; 1 (with one line, no traceback) without
    matplotlib."""
    if path is None:
        return 0
    try:
        draw()
    except PlotUnavailable as err:
        print(f"harmony report: {err}", file=sys.stderr)
        return 1
    print(f"plot written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    >>> main(["report", "gpt-tiny", "--batch-size", "4"])  # doctest: +ELLIPSIS
    harmony report: gpt-tiny ...
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _env(args) if args.command == "env" else _report(args)
    except (ValueError, OSError) as err:  # (a file that could not be read or written too)
        print(f"harmony {args.command}: error: {err}", file=sys.stderr)
        return 2
