"""A training run that tests/integration/test_crash.py kills with SIGKILL and restarts until it
finishes.

    python tests/crash_worker.py CKPT_DIR NVME_DIR OUT [--steps N] [--every K]
                                 [--progress FILE] [--pause EVENT@N]
    python tests/crash_worker.py --serve

Trains a tiny transformer with dropout (tests/models.py) with harmony, with device and host
budgets small enough that every pack's weights and optimizer state live in NVMe files under
NVME_DIR. Step ``s`` always trains on the same batch (drawn from a generator seeded with ``s``),
so a run resumed from a checkpoint sees the batches an uninterrupted run would. A checkpoint is
saved to CKPT_DIR every K steps and after the last one; a run that finds a checkpoint there
resumes from it (``trainer.load(CKPT_DIR)``, then continues from ``trainer.step_count``). At the
end the final ``state_dict()`` goes to the safetensors file OUT (a temporary name, then renamed).

``--serve`` (a fork server, because starting an interpreter with torch, DeepSpeed's async I/O op
and a first optimizer costs this 2-core machine about 10 s): imports everything, warms up with
one short run in a scratch directory, prints ``ready``, then reads one JSON list of arguments per
line from stdin; for each it forks a child that runs them as above (a real process, which the
test kills), prints ``pid <pid>``, reaps it and prints ``exit <pid> <status>`` (the negative
signal number if it was killed). The server takes no other part in training.

Progress: with ``--progress FILE`` (or env ``CRASH_PROGRESS``) the worker appends one line per
event, ``<pid> <time.monotonic()> <event> <arg>``, so the test can tell where a kill landed:

    start -                     the run began (imports done)
    train <step>                constructed and (maybe) loaded; training begins at <step>
    step+ <s> / step- <s>       one optimizer step, from step count s
    ckpt+ <s> / ckpt- <s> <sha256 of model.safetensors> <sha256 of optimizer.safetensors>
                                Trainer.save after s steps
    ck.write <name>             checkpoint: about to write tensor file <name> (temporary dir)
    ck.fsync <name>             checkpoint: <name> is written, about to fsync it
    ck.fsyncdir tmp|root        checkpoint: about to fsync the temporary dir (all files in) or
                                the root (after a rename)
    ck.replace <name>           checkpoint: about to rename into place (ckpt-*, LATEST)
    ck.rmtree <name>            checkpoint: about to remove an older or replaced checkpoint
    nv.w+ <id> <key>            NVMe store: a write was issued
    nv.w- <id>                  NVMe store: that write completed
    pause <event>               the worker stopped here on purpose and waits to be killed
    done <step>                 finished: OUT written, trainer closed

``--pause EVENT@N`` (or env ``CRASH_PAUSE``) stops the run for good at the N-th occurrence in
this process of ``EVENT``: ``ck.write:model.safetensors``, ``ck.fsync:meta.json``,
``ck.replace:ckpt`` (any ``ckpt-*``), ``ck.replace:LATEST``, ``ck.rmtree:ckpt``, ... or
``nv.chunk`` (in an NVMe worker thread, once a write's file is created and its blocks reserved
but before its bytes are written). It logs ``pause <event>`` first; the test then kills it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors.torch
import torch

import harmony
from harmony.io import checkpoint
from swap import nvme
from tests import copier
from tests.models import MODELS, training_state_bytes

BATCH = 7
MICRO = 3
DROPOUT = 0.1
SEED = 5


class Progress:
    """Appends event lines to a file (single O_APPEND writes: safe from any thread)."""

    def __init__(self) -> None:
        self.fd = -1
        self.pid = os.getpid()
        self.pause_event: str | None = None
        self.pause_at = 0
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def configure(self, path: str | None, pause: str | None) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if path else -1
        self.pid = os.getpid()
        self.pause_event, self.pause_at = None, 0
        if pause:
            event, _, n = pause.rpartition("@")
            self.pause_event, self.pause_at = event, int(n)
        self.counts = {}

    def log(self, event: str, *args: object) -> None:
        if self.fd >= 0:
            line = " ".join([str(self.pid), f"{time.monotonic():.4f}", event,
                             *(str(a) for a in args)])
            os.write(self.fd, (line + "\n").encode())

    def hook(self, event: str, arg: str | None = None) -> None:
        """Log ``event arg`` (a bare ``event`` is not logged) and stop if it is the pause point."""
        if arg is not None:
            self.log(event, arg)
        if self.pause_event is None:
            return
        name = event if arg is None else f"{event}:{re.sub(r'^ckpt-[0-9]+$', 'ckpt', arg)}"
        if name != self.pause_event:
            return
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            hit = self.counts[name] == self.pause_at
        if hit:
            self.log("pause", name)
            while True:  # the test kills us here
                time.sleep(60)


PROGRESS = Progress()
_instrumented = False


class _OsProxy:
    """``os`` as harmony.io.checkpoint sees it: with a hook before ``replace``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        PROGRESS.hook("ck.replace", Path(dst).name)
        os.replace(src, dst)


def instrument() -> None:
    """Put progress hooks around the checkpoint writer's steps and the NVMe store's writes.

    Only this process's module attributes change (harmony.io.checkpoint gets its own ``os`` and
    ``shutil`` stand-ins); what runs between the hooks is harmony's code, unchanged.
    """
    global _instrumented
    if _instrumented:
        return
    _instrumented = True
    real_fsync_file, real_fsync_dir = checkpoint._fsync_file, checkpoint._fsync_dir
    real_rmtree = checkpoint.shutil.rmtree

    def fsync_file(path: Path) -> None:
        PROGRESS.hook("ck.fsync", Path(path).name)
        real_fsync_file(path)

    def fsync_dir(path: Path) -> None:
        PROGRESS.hook("ck.fsyncdir", "tmp" if Path(path).name.startswith(".tmp-") else "root")
        real_fsync_dir(path)

    real_write_tensors = checkpoint.write_safetensors

    def write_safetensors(tensors: Any, path: Any, metadata: Any = None, todo: str = "") -> None:
        PROGRESS.hook("ck.write", Path(path).name)
        real_write_tensors(tensors, path, metadata, todo)

    def rmtree(path: Any, ignore_errors: bool = False) -> None:
        PROGRESS.hook("ck.rmtree", Path(path).name)
        real_rmtree(path, ignore_errors=ignore_errors)

    checkpoint.write_safetensors = write_safetensors  # type: ignore[assignment]
    checkpoint._fsync_file = fsync_file
    checkpoint._fsync_dir = fsync_dir
    checkpoint.shutil = SimpleNamespace(rmtree=rmtree)  # type: ignore[assignment]
    checkpoint.os = _OsProxy()  # type: ignore[assignment]

    real_write, real_chunk = nvme.NvmeStore.write, nvme.NvmeStore._run_chunk
    ids = iter(range(1 << 62))
    ids_lock = threading.Lock()

    def write(self: nvme.NvmeStore, key: str, src: torch.Tensor) -> Any:
        with ids_lock:
            n = next(ids)
        PROGRESS.log("nv.w+", n, key)
        handle = real_write(self, key, src)
        handle.add_done_callback(lambda: PROGRESS.log("nv.w-", n))
        return handle

    def run_chunk(self: nvme.NvmeStore, job: Any, off: int, length: int) -> None:
        if job.op == "write":
            PROGRESS.hook("nv.chunk")
        real_chunk(self, job, off, length)

    nvme.NvmeStore.write = write  # type: ignore[method-assign]
    nvme.NvmeStore._run_chunk = run_chunk  # type: ignore[method-assign]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``step``: the same in every run."""
    g = torch.Generator().manual_seed(1000 + step)
    return MODELS["transformer"][2](BATCH, g)


def optimizer(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def make_trainer(nvme_dir: str | os.PathLike[str]) -> harmony.Trainer:
    factory, loss_fn, _ = MODELS["transformer"]
    state = training_state_bytes(factory(0.0), 8)
    # Half the training state fits on the device and half on the host: every pack's weights
    # and optimizer state live in NVMe files and move in and out every step.
    # O_DIRECT threads, not DeepSpeed's aio op: the fork server forks after a warm-up, and
    # the op's C++ threads do not survive a fork (a child sometimes aborted with
    # std::system_error).
    return harmony.Trainer(factory(DROPOUT), loss_fn, optimizer=optimizer,
                           micro_batch_size=MICRO, device_memory=state // 2,
                           host_memory=state // 2, nvme_dir=str(nvme_dir), seed=SEED,
                           nvme_backend="odirect")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("nvme_dir")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("CRASH_STEPS", "30")))
    ap.add_argument("--every", type=int, default=int(os.environ.get("CRASH_EVERY", "1")))
    ap.add_argument("--progress", default=os.environ.get("CRASH_PROGRESS"))
    ap.add_argument("--pause", default=os.environ.get("CRASH_PAUSE"))
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Train (resuming if CKPT_DIR holds a checkpoint) to ``args.steps``; write OUT."""
    torch.set_num_threads(1)
    instrument()
    PROGRESS.configure(args.progress, args.pause)
    PROGRESS.log("start", "-")
    trainer = make_trainer(args.nvme_dir)
    if checkpoint.latest(args.ckpt_dir) is not None:
        trainer.load(args.ckpt_dir)
    PROGRESS.log("train", trainer.step_count)
    if trainer.step_count >= args.steps:  # nothing left to save: finish what a killed save left
        checkpoint.finish_interrupted_save(args.ckpt_dir)
    while trainer.step_count < args.steps:
        s = trainer.step_count
        PROGRESS.log("step+", s)
        trainer.step(*batch(s))
        PROGRESS.log("step-", s)
        if trainer.step_count % args.every == 0 or trainer.step_count == args.steps:
            PROGRESS.log("ckpt+", trainer.step_count)
            saved = trainer.save(args.ckpt_dir)
            sums = json.loads((saved / "meta.json").read_text())["sha256"]
            PROGRESS.log("ckpt-", trainer.step_count, *(sums[n] for n in checkpoint.TENSOR_FILES))
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    safetensors.torch.save_file(trainer.state_dict(), tmp,
                                metadata={"copier": copier.used(trainer)})
    os.replace(tmp, out)
    trainer.close()
    PROGRESS.log("done", trainer.step_count)
    return 0


def serve() -> int:
    """The fork server (see the module docstring)."""
    # Replies go to the original stdout; everything else printed (DeepSpeed logs to stdout)
    # goes to stderr.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(1)
    instrument()
    with tempfile.TemporaryDirectory(prefix="crash-warmup-") as d:
        (Path(d) / "nvme").mkdir()
        # One short run pays the one-time costs (the aio op, the optimizer's first import,
        # the bandwidth probe) here rather than in every child; it shares no state with them.
        run(parse([f"{d}/ckpt", f"{d}/nvme", f"{d}/out.safetensors", "--steps", "2",
                   "--progress", "", "--pause", ""]))
        t = make_trainer(Path(d) / "nvme")
        t.load(f"{d}/ckpt")
        t.close()
    print("ready", file=reply, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        args = parse(json.loads(line))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one run, then exit without the server's cleanup
            reply.close()
            code = 1
            try:
                code = run(args)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", file=reply, flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        raise SystemExit(serve())
    raise SystemExit(run(parse(sys.argv[1:])))
