"""SIGKILL at random moments: a run restarted from its checkpoints ends bit for bit where an
uninterrupted run ends, and leaves one checkpoint and no NVMe files behind.

The runs are tests/crash_worker.py: a tiny transformer with dropout whose weights and optimizer
state live in NVMe files, saving a checkpoint after every step. The uninterrupted reference is a
fresh interpreter; the runs that get killed are children of the worker's fork server (starting a
fresh interpreter costs ~10 s here). Each trial starts a run, which resumes from the checkpoint
the last killed run left, and kills it:

- at a random delay after training began, or after the process started (seeded);
- or at a named point inside ``Trainer.save`` (a file half done, before a rename, ...) or while
  an NVMe write is in flight: the worker stops there (``--pause``) and the kill follows after a
  random delay of a few milliseconds.

After each kill the newest checkpoint must load (its SHA-256 sums verify) and be the
uninterrupted run's checkpoint of that step, byte for byte, and no completed checkpoint may be
lost. When a run finishes, its final weights must equal the reference's (``torch.equal``), its
checkpoint directory must hold exactly one checkpoint plus ``LATEST`` (and the writers' lock
file), and the NVMe directory
must be empty: the dead runs' private directories were swept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from harmony.io import checkpoint
from tests import copier

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="the crash worker forks; Linux only")

WORKER = Path(__file__).resolve().parents[1] / "crash_worker.py"
STEPS = 24
SEED = 20261125
TIMEOUT = 120.0  # seconds for any one wait on the worker: a hang fails instead of blocking

# Where the targeted trials stop the worker before the kill (see crash_worker.py).
PAUSES = [
    "ck.write:model.safetensors",      # the temporary checkpoint dir exists, still empty
    "ck.write:optimizer.safetensors",  # model file done, optimizer file not begun
    "ck.fsync:meta.json",              # all files written, nothing synced or renamed
    "ck.replace:ckpt",                 # complete, about to be renamed into place
    "ck.fsync:.LATEST.tmp",            # renamed; LATEST still names the previous one
    "ck.replace:LATEST",               # the new LATEST written, not yet in place
    "ck.rmtree:ckpt",                  # LATEST moved on; the older checkpoint still there
    "nv.chunk", "nv.chunk", "nv.chunk", "nv.chunk",  # an NVMe write's file created, not filled
]
RANDOM_AFTER_TRAIN = 10  # kills at uniform(0, 0.4) s after 0-2 steps of training
RANDOM_AFTER_START = 2   # kills at uniform(0, 0.15) s after the fork (construction, load)


class Server:
    """The worker's fork server: runs one argument list at a time in a forked child."""

    def __init__(self, log: Path) -> None:
        self.stderr = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, cwd=WORKER.parents[1])
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.log = log

    def line(self, timeout: float | None) -> str | None:
        """The next line the server printed; None if none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise AssertionError(f"the crash worker's server died:\n{self.tail()}")
            self.buffer += chunk
        out, _, self.buffer = self.buffer.partition(b"\n")
        return out.decode()

    def expect(self, prefix: str) -> list[str]:
        got = self.line(TIMEOUT)
        if got is None or not got.startswith(prefix):
            raise AssertionError(f"expected {prefix!r} from the server, got {got!r}:\n"
                                 f"{self.tail()}")
        return got.split()

    def start(self, argv: list[str]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(argv) + "\n").encode())
        self.proc.stdin.flush()
        return int(self.expect("pid ")[1])

    def tail(self) -> str:
        self.stderr.flush()
        return self.log.read_text()[-3000:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _read_events(path: Path) -> dict[int, list[list[str]]]:
    """pid -> its progress lines as ``[time, event, args...]``."""
    out: dict[int, list[list[str]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            pid, *rest = line.split()
            out.setdefault(int(pid), []).append(rest)
    return out


def _landing(events: list[list[str]]) -> tuple[str, bool, bool]:
    """Where a killed run was: (description, inside Trainer.save, an NVMe write in flight)."""
    open_writes: set[str] = set()
    in_ckpt, ck_phase, in_step, began = False, "collecting state", False, False
    paused = None
    for _, ev, *args in events:
        if ev == "nv.w+":
            open_writes.add(args[0])
        elif ev == "nv.w-":
            open_writes.discard(args[0])
        elif ev == "train":
            began = True
        elif ev == "step+":
            in_step = True
        elif ev == "step-":
            in_step = False
        elif ev == "ckpt+":
            in_ckpt, ck_phase = True, "collecting state"
        elif ev == "ckpt-":
            in_ckpt = False
        elif ev.startswith("ck."):
            name = args[0]
            if name.startswith("ckpt-"):
                name = "ckpt-*"
            ck_phase = f"{ev} {name}"
        elif ev == "pause":
            paused = args[0]
    nvme = bool(open_writes)
    if paused is not None:
        where = f"paused at {paused}"
    elif not began:
        where = "startup (construct, sweep, load)"
    elif in_ckpt:
        where = f"save: after {ck_phase}"
    elif in_step:
        where = "step"
    else:
        where = "between steps"
    return where, in_ckpt or (paused or "").startswith("ck."), nvme


@dataclass
class Campaign:
    """One sequence of runs, killed and restarted, towards STEPS steps."""

    root: Path
    index: int
    pids: list[int] = field(default_factory=list)

    @property
    def ckpt(self) -> Path:
        return self.root / f"c{self.index}" / "ckpt"

    @property
    def nvme(self) -> Path:
        return self.root / f"c{self.index}" / "nvme"

    @property
    def out(self) -> Path:
        return self.root / f"c{self.index}" / "out.safetensors"

    def argv(self, progress: Path, pause: str | None = None) -> list[str]:
        self.nvme.mkdir(parents=True, exist_ok=True)
        argv = [str(self.ckpt), str(self.nvme), str(self.out), "--steps", str(STEPS),
                "--progress", str(progress)]
        return argv + (["--pause", pause] if pause else [])


def _ckpt_sums(events: list[list[str]]) -> dict[int, tuple[str, str]]:
    return {int(a[0]): (a[1], a[2]) for _, ev, *a in events if ev == "ckpt-"}


def _wait_for(server: Server, progress: Path, pid: int, event: str, steps: int = 0) -> bool:
    """Poll until ``pid`` logged ``event`` and then ``steps`` ends of steps (True), or exited
    (False; its exit line is left for :meth:`Server.expect`)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        events = [e[1] for e in _read_events(progress).get(pid, [])]
        if event in events and events[events.index(event):].count("step-") >= steps:
            return True
        got = server.line(0.003)
        if got is not None:
            server.buffer = (got + "\n").encode() + server.buffer  # leave it for expect()
            return False
    raise AssertionError(f"run {pid} never logged {event!r}:\n{server.tail()}")


def _check_finished(campaign: Campaign, want: dict[str, torch.Tensor]) -> None:
    got = safetensors.torch.load_file(campaign.out)
    with safetensors.safe_open(campaign.out, "pt") as f:  # (a child inherits HARMONY_COPIER)
        assert f.metadata() == {"copier": copier.expected()}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs from the uninterrupted run's"
    assert sorted(set(os.listdir(campaign.ckpt)) - {checkpoint.LOCK_NAME}) == [
        "LATEST", f"ckpt-{STEPS:09d}"]
    assert (campaign.ckpt / "LATEST").read_text().strip() == f"ckpt-{STEPS:09d}"
    assert os.listdir(campaign.nvme) == [], "NVMe directories of dead runs were left behind"


def test_sigkill_anywhere_resumes_bitwise(tmp_path: Path) -> None:
    t_begin = time.monotonic()
    rng = random.Random(SEED)
    progress = tmp_path / "progress.log"
    # The uninterrupted reference: a fresh interpreter, concurrently with the server's start.
    ref = tmp_path / "ref"
    (ref / "nvme").mkdir(parents=True)
    ref_progress = tmp_path / "ref-progress.log"
    reference = subprocess.Popen(
        [sys.executable, str(WORKER), str(ref / "ckpt"), str(ref / "nvme"),
         str(ref / "out.safetensors"), "--steps", str(STEPS), "--progress", str(ref_progress)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=WORKER.parents[1])
    server = Server(tmp_path / "server.log")
    try:
        server.expect("ready")
        ref_out, _ = reference.communicate(timeout=TIMEOUT)
        assert reference.returncode == 0, ref_out.decode()[-3000:]
        ref_events = next(iter(_read_events(ref_progress).values()))
        want_sums = _ckpt_sums(ref_events)
        assert sorted(want_sums) == list(range(1, STEPS + 1))
        want = safetensors.torch.load_file(ref / "out.safetensors")
        with safetensors.safe_open(ref / "out.safetensors", "pt") as f:  # (it inherits the mode)
            assert f.metadata() == {"copier": copier.expected()}
        t_ready = time.monotonic()

        trials = [("pause", p) for p in PAUSES] + [("train", None)] * RANDOM_AFTER_TRAIN \
            + [("start", None)] * RANDOM_AFTER_START
        rng.shuffle(trials)
        campaign = Campaign(tmp_path, 0)
        landings: list[tuple[str, bool, bool]] = []
        finished = 0
        stale_seen = 0
        while trials:
            mode, point = trials.pop(0)
            pause = None
            if point == "nv.chunk":
                pause = f"nv.chunk@{rng.randint(1, 24)}"
            elif point is not None:
                pause = f"{point}@{rng.randint(1, 2)}"
            pid = server.start(campaign.argv(progress, pause))
            campaign.pids.append(pid)
            t_fork = time.monotonic()
            alive = True
            if mode == "start":
                time.sleep(max(0.0, rng.uniform(0.0, 0.15) - (time.monotonic() - t_fork)))
            elif mode == "train":  # after 0-2 more steps (the first one profiles: slow)
                steps, delay = rng.randint(0, 2), rng.uniform(0.0, 0.4)
                alive = _wait_for(server, progress, pid, "train", steps)
                time.sleep(delay if alive else 0.0)
            else:
                delay = rng.uniform(0.0, 0.01)
                alive = _wait_for(server, progress, pid, "pause")
                time.sleep(delay if alive else 0.0)
            if alive:
                with contextlib.suppress(ProcessLookupError):  # it just ended on its own
                    os.kill(pid, signal.SIGKILL)
            status = int(server.expect(f"exit {pid} ")[2])
            events = _read_events(progress)
            if status == 0:  # it reached STEPS before the kill: check it, start over
                _check_finished(campaign, want)
                finished += 1
                assert finished <= 5, "runs keep finishing before they are killed"
                campaign = Campaign(tmp_path, campaign.index + 1)
                trials.append((mode, point))  # this trial's kill is still to come
                continue
            assert status == -signal.SIGKILL, f"run {pid} failed on its own:\n{server.tail()}"
            mine = events.get(pid, [])
            landings.append(_landing(mine))
            stale_seen += any(p.name.startswith(f"harmony-{pid}-")
                              for p in campaign.nvme.iterdir())
            # The newest checkpoint is complete and is the uninterrupted run's of its step,
            # and no completed save was lost.
            done = [s for p in campaign.pids for s in _ckpt_sums(events.get(p, []))]
            # (a killed save may have completed without logging so: those count as well)
            started = {int(a[0]) for p in campaign.pids for _, ev, *a in events.get(p, [])
                       if ev == "ckpt+"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "ignoring incomplete checkpoint ..."
                latest = checkpoint.latest(campaign.ckpt)
            if latest is None:
                assert not done, f"run {pid}: the checkpoint of step {max(done)} was lost"
                continue
            _, _, meta = checkpoint.load(latest)  # raises if a file is torn or corrupted
            step = meta["step"]
            assert (meta["sha256"]["model.safetensors"],
                    meta["sha256"]["optimizer.safetensors"]) == want_sums[step], (
                f"run {pid}: checkpoint of step {step} differs from the uninterrupted run's")
            newest_done = max(done, default=0)
            assert step >= newest_done and step in started, (
                f"run {pid}: newest checkpoint is of step {step}, but step {newest_done} "
                "was saved")
        t_trials = time.monotonic()

        # The last restart, left alone, finishes.
        pid = server.start(campaign.argv(progress))
        campaign.pids.append(pid)
        status = int(server.expect(f"exit {pid} ")[2])
        assert status == 0, f"the resumed run failed ({status}):\n{server.tail()}"
        _check_finished(campaign, want)
        finished += 1
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
        server.close()
    t_end = time.monotonic()

    kills = len(landings)
    where = Counter(w for w, _, _ in landings)
    in_save = sum(s for _, s, _ in landings)
    in_nvme = sum(n for _, _, n in landings)
    print(f"\n{kills} kills in {t_trials - t_ready:.1f}s ({t_ready - t_begin:.1f}s to start, "
          f"{t_end - t_trials:.1f}s to finish); {finished} run(s) finished; "
          f"{in_save} inside Trainer.save, {in_nvme} with an NVMe write in flight; "
          f"{stale_seen} killed runs left a private NVMe dir (all swept)")
    for w, n in sorted(where.items()):
        print(f"  {n:3d}  {w}")
    assert kills >= 20
    assert in_save >= 7 and in_nvme >= 4
    assert stale_seen >= kills // 2
