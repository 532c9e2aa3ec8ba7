"""The process's resident memory while training, against the budgets it was given.

Each case trains a decoder (``harmony.tools.builtin_models.Transformer``, 98M parameters by default:
391 MB of fp32 weights, 1.5 GiB of AdamW training state) for a few steps in a fresh process,
under budgets sized from its training state, and prints per case: the budgets, the peaks the
tiers accounted, the peak resident set (RSS) above the baseline, and the bound harmony keeps,
``1.10 x (host_memory + device_memory) + 256 MiB`` (README, "Budgets").

The baseline is the RSS after ``import harmony, torch`` and the model's construction, its
temporaries released (so a model built on CPU counts in it; ``--build meta`` builds it on the
meta device and lets the trainer initialize it pack by pack, and then the baseline holds no
weights at all). The peak is Linux's ``VmHWM``, reset at the baseline.

    python examples/bench_memory.py --nvme-dir /tmp/harmony-nvme            # ~3 min on 2 cores
    python examples/bench_memory.py --nvme-dir /tmp/harmony-nvme --build meta --cases nvme
    python examples/bench_memory.py --n-layer 4 --dim 512 --steps 2        # smaller and faster
    python examples/bench_memory.py --nvme-dir /tmp/harmony-nvme --cases nvme --resume

``--rehome``: the device budget is raised by a quarter before the second step, so the state
moves to new packs (a re-home) inside the measured run. ``--resume``: after training, each
case saves a checkpoint, and a new trainer (its model on the meta device) loads it and steps
once; its peak RSS is measured from a baseline of its own.

Exit status 1 if any case broke the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# The harmony of the checkout this script is in, whatever another install provides (each case
# runs in a fresh process: it measures this checkout's code).
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "harmony" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Case:
    """Budgets, and the chunks of NVMe updates, as fractions of the model's training state
    (16 bytes per parameter); ``update_chunk`` None: whole packs."""

    device: float
    host: float
    nvme: bool = False
    update_chunk: float | None = None
    overlap: bool = False


CASES = {
    "device": Case(device=1.5, host=0.05),
    "host": Case(device=0.12, host=1.2),
    "host, overlapped": Case(device=0.12, host=1.2, overlap=True),
    "nvme": Case(device=0.12, host=0.3, nvme=True),
    "nvme, chunked": Case(device=0.12, host=0.2, nvme=True, update_chunk=0.015),
    "nvme, chunked, overlapped": Case(device=0.12, host=0.2, nvme=True, update_chunk=0.015,
                                      overlap=True),
}


# The measurement is the script's own (not harmony's), so that it measures any version.
def rss_bytes() -> int:
    """The process's resident set, bytes."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int | None:
    """Linux's VmHWM: the peak resident set since start or :func:`reset_peak_rss`."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def trim() -> None:
    """Return malloc's free heap pages before the baseline is taken (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_supported() -> bool:
    """Whether this system reports the peak resident set (Linux's VmHWM)."""
    return peak_rss_bytes() is not None


def bound(device: int, host: int) -> int:
    """The most resident memory above the baseline a run may take (README, "Budgets")."""
    return int(1.10 * (host + device)) + 256 * MIB


def _config(args: argparse.Namespace) -> object:
    from harmony.tools.builtin_models import TransformerConfig

    return TransformerConfig(vocab_size=args.vocab, n_layer=args.n_layer, dim=args.dim,
                             n_head=args.dim // 64, ffn_hidden=4 * args.dim,
                             max_seq_len=args.seq_len)


def child(args: argparse.Namespace) -> dict[str, object]:
    """One case, in this (fresh) process: build, take the baseline, train, measure."""
    import torch

    import harmony
    from harmony.tools.builtin_models import Transformer, _init_weights, token_cross_entropy

    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    config = _config(args)
    torch.manual_seed(0)
    if args.build == "meta":
        with torch.device("meta"):
            model = Transformer(config)
    else:
        model = Transformer(config)
    params = sum(p.numel() for p in model.parameters())
    state = 16 * params
    device, host = int(case.device * state), int(case.host * state)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g),
             torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g))
            for _ in range(args.steps)]
    gc.collect()
    trim()
    base = rss_bytes()
    reset_peak_rss()
    kwargs: dict[str, object] = {}
    if args.build == "meta":  # each module's defaults (norms), then the model's own init
        from harmony.model.materialize import default_init

        kwargs["init"] = lambda layer: (default_init(layer), layer.apply(_init_weights))
    t0 = time.perf_counter()
    trainer = harmony.Trainer(
        model, token_cross_entropy, micro_batch_size=args.micro_batch_size,
        device_memory=device, host_memory=host,
        nvme_dir=args.nvme_dir if case.nvme else None,
        update_chunk=None if case.update_chunk is None else int(case.update_chunk * state),
        overlap_updates=case.overlap, **kwargs)
    after: list[int] = []
    ckpt = Path(tempfile.mkdtemp(prefix="bench-memory-ckpt-", dir=args.nvme_dir)) \
        if args.resume else None
    with trainer:
        for i, (x, y) in enumerate(data):
            if i == 1 and args.rehome:  # a new budget: the state moves to new packs
                trainer.device_memory = int(1.25 * device)
            trainer.step(x, y)
            after.append(rss_bytes() - base)
        assert trainer.plan is not None
        peaks = {loc.value: tier.peak for loc, tier in trainer.tiers.items()}
        placement = trainer.plan.placement.to_json()
        chunk = trainer.plan.update_chunk
        overlapped = trainer.plan.overlap_updates
        if ckpt is not None:
            trainer.save(ckpt)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    result = {"case": args.case, "build": args.build, "params": params, "state": state,
              "device": device, "host": host, "peaks": peaks,
              "peak_rss": None if peak is None else peak - base, "rss_after": after,
              "bound": bound(device, host), "placement": placement, "update_chunk": chunk,
              "overlap": overlapped, "seconds": seconds, "resume_peak_rss": None}
    if ckpt is not None:  # a new trainer, its model on the meta device, loads it and steps on
        del trainer, model
        gc.collect()
        trim()
        base = rss_bytes()
        reset_peak_rss()
        with torch.device("meta"):
            model = Transformer(config)
        with harmony.Trainer(
                model, token_cross_entropy, micro_batch_size=args.micro_batch_size,
                device_memory=device, host_memory=host,
                nvme_dir=args.nvme_dir if case.nvme else None, update_chunk=None
                if case.update_chunk is None else int(case.update_chunk * state),
                overlap_updates=case.overlap, weights=ckpt) as resumed:
            resumed.load(ckpt)
            resumed.step(*data[0])
        peak = peak_rss_bytes()
        result["resume_peak_rss"] = None if peak is None else peak - base
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def run_case(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Run case ``name`` in a fresh process; its measurements."""
    cmd = [sys.executable, __file__, "--child", name, "--build", args.build,
           "--n-layer", str(args.n_layer), "--dim", str(args.dim), "--vocab", str(args.vocab),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--resume"] if args.resume else []) + (
               ["--rehome"] if getattr(args, "rehome", False) else [])
    if args.nvme_dir is not None:
        cmd += ["--nvme-dir", args.nvme_dir]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"case {name!r} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _where(placement: dict[str, list[str]]) -> str:
    return "W,K " + "/".join(sorted(set(placement["w"]))) + "; X " + "/".join(
        sorted(set(placement["x"])))


def _over(r: dict[str, object]) -> bool:
    """Whether a case's peak RSS, training or loading its checkpoint, broke the bound."""
    peaks = [r["peak_rss"], r.get("resume_peak_rss")]
    return any(p is not None and p > r["bound"] for p in peaks)  # type: ignore[operator]


def table(results: list[dict[str, object]]) -> str:
    head = (f"{'case':<27} {'build':<5} {'device':>9} {'host':>9} {'acc. device':>11} "
            f"{'acc. host':>10} {'acc. nvme':>10} {'peak RSS':>9} {'load RSS':>9} {'bound':>9}"
            "  placement")
    lines = [head, "-" * len(head)]
    for r in results:
        peaks: dict[str, int] = r["peaks"]  # type: ignore[assignment]
        peak, load = r["peak_rss"], r.get("resume_peak_rss")
        mark = "  OVER" if _over(r) else ""
        lines.append(
            f"{r['case']:<27} {r['build']:<5} {r['device'] / MIB:>7.0f}Mi "  # type: ignore[operator]
            f"{r['host'] / MIB:>7.0f}Mi "  # type: ignore[operator]
            f"{peaks.get('device', 0) / MIB:>9.0f}Mi {peaks.get('host', 0) / MIB:>8.0f}Mi "
            f"{peaks.get('nvme', 0) / MIB:>8.0f}Mi "
            f"{'?' if peak is None else f'{peak / MIB:.0f}Mi':>9} "  # type: ignore[operator]
            f"{'-' if load is None else f'{load / MIB:.0f}Mi':>9} "  # type: ignore[operator]
            f"{r['bound'] / MIB:>7.0f}Mi  {_where(r['placement'])}"  # type: ignore[arg-type,operator]
            + (f", chunks {r['update_chunk'] / MIB:.0f}Mi" if r["update_chunk"] else "")  # type: ignore[operator]
            + (", overlapped" if r["overlap"] else "") + mark)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=None, choices=list(CASES),
                    help="which cases (default: all; the NVMe ones need --nvme-dir)")
    ap.add_argument("--nvme-dir", default=None)
    ap.add_argument("--build", choices=["cpu", "meta"], default="cpu",
                    help="build the model on CPU (its weights in the baseline) or on the "
                         "meta device (the trainer initializes it pack by pack)")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="then save a checkpoint, load it into a new trainer (its model on "
                         "the meta device) and step: the load's peak RSS, within the same bound")
    ap.add_argument("--rehome", action="store_true",
                    help="set a new device budget (1.25 x) before the second step, so that "
                         "the training state moves to new packs within the run measured")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        args.case = args.child
        print(json.dumps(child(args)))
        return 0
    names = args.cases or [n for n, c in CASES.items() if args.nvme_dir or not c.nvme]
    if any(CASES[n].nvme for n in names) and args.nvme_dir is None:
        ap.error("the NVMe cases need --nvme-dir (an existing directory)")
    results = []
    for name in names:
        results.append(run_case(name, args))
        print(table(results[-1:]).splitlines()[-1] if len(results) > 1 else table(results),
              flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(_over(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
