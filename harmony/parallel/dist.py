"""The process group every multi-process mode of harmony runs in.

One rule for data parallelism and pipeline parallelism alike: use the default
``torch.distributed`` group when the caller initialized one; otherwise initialize it from the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
with NCCL for a CUDA device and gloo on CPU, and a timeout so that a rank that stops answering
makes the others fail instead of waiting forever. The same code runs on one machine
(``torchrun --standalone --nproc_per_node=N``) and across machines (``--nnodes`` with a
rendezvous endpoint): nothing here reads host names.

``HARMONY_DIST_TIMEOUT`` (seconds, default 600) sets the timeout of a group harmony creates.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Group:
    """Where this process stands in the job.

    rank, world: this rank and the number of ranks. local_rank, local_world: the same among
    the ranks of this machine (they share its host memory bus and NVMe drives). backend:
    ``"gloo"`` or ``"nccl"``. owned: harmony initialized the group (it lives until the
    process exits, for every later trainer of the process).
    """

    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str
    owned: bool


def join(device: torch.device, what: str = "parallel='data'",
         timeout_s: float | None = None) -> Group:
    """Join the default process group, initializing it from torchrun's environment if needed.

    On CUDA the device is made this process's current device first (``torch.cuda.set_device``),
    so that what NCCL stages on "the current device" (the object collectives' bytes, its
    communicator) is on this rank's GPU, not GPU 0 on every rank; a group created here is also
    bound to it (``device_id``, where this PyTorch has it).

    Args:
        device: the compute device; picks the backend (NCCL for CUDA, gloo for CPU).
        what: the setting that asked for a group, for the error message.
        timeout_s: collective timeout of a group created here (default
            ``HARMONY_DIST_TIMEOUT`` or 600 s).

    Returns:
        the :class:`Group`.

    Raises:
        ValueError: no group is initialized and the torchrun variables are missing; the
            message says how to launch.

    Example::

        # under torchrun --nproc_per_node=2
        group = harmony.parallel.dist.join(torch.device("cpu"))
        print(group.rank, group.world)                   # 0 2  /  1 2
    """
    if not dist.is_available():
        raise ValueError(f"{what} needs torch.distributed, which this PyTorch build lacks")
    if device.type == "cuda":
        device = bind_device(device)
    owned = False
    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ValueError(
                f"{what} needs a process group: none is initialized and the torchrun "
                f"variables {', '.join(missing)} are not set. Launch with `torchrun "
                "--nproc_per_node=N script.py` (add --nnodes/--rdzv-endpoint across machines), "
                "or call torch.distributed.init_process_group() before building the Trainer; "
                "for one process use parallel=None")
        if timeout_s is None:
            timeout_s = float(os.environ.get("HARMONY_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict[str, Any] = {}
        if device.type == "cuda" and _takes_device_id():
            options["device_id"] = device  # binds NCCL's communicator to this rank's GPU
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **options)
        # Kept for later trainers in this process (a second init from the same torchrun
        # store would not work), and destroyed when the interpreter exits.
        atexit.register(_destroy)
        owned = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or _count_local(world)
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank % local_world)))
    return Group(rank, world, local_rank, local_world, str(dist.get_backend()), owned)


def bind_device(device: torch.device) -> torch.device:
    """Make CUDA ``device`` the current device of this process; returns it with its index
    (``cuda`` alone: the current device).

    Raises:
        ValueError: the index is not a GPU of this machine; the message says how many there are.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device {device} is not a GPU of this machine ({count} visible); "
                         f"use cuda:0 ... cuda:{count - 1} (under torchrun, LOCAL_RANK "
                         "picks it: give --nproc_per_node <= the GPUs)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _takes_device_id() -> bool:
    """Whether this PyTorch's init_process_group accepts ``device_id``."""
    try:
        return "device_id" in inspect.signature(dist.init_process_group).parameters
    except (TypeError, ValueError):
        return False


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) under torchrun.

    >>> local_device(torch.device("cpu"))
    device(type='cpu')
    """
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _count_local(world: int) -> int:
    """Ranks on this machine, when torchrun did not say: count equal host names."""
    import socket

    names: list[str | None] = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    return max(1, names.count(socket.gethostname()))


def abort(group: Group) -> None:
    """Tear the group down after a failure, so the other ranks' pending collectives fail at
    once (their peer is gone) instead of waiting for the timeout."""
    if dist.is_initialized():
        # Aborting closes the connections now; destroying alone may leave them open (and the
        # peers waiting for the timeout) while anything still refers to the group. A group
        # already broken may fail to close: the peers see the failure either way.
        abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort_group is not None:
            with contextlib.suppress(Exception):
                abort_group()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _destroy() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def measure_allreduce(device: torch.device, nbytes: int = 4 << 20, repeat: int = 2) -> float:
    """Bytes/s one rank moves in an all-reduce (ring bytes over seconds); collective: every
    rank must call it. Returns 0.0 for a single rank."""
    from schedules.data_parallel import ring_bytes

    world = dist.get_world_size()
    if world == 1:
        return 0.0
    buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    dist.all_reduce(buf)  # warm-up: connections and buffers
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / repeat
    mine = torch.tensor([ring_bytes(nbytes, world) / max(seconds, 1e-9)], dtype=torch.float64,
                        device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)  # every rank plans with the same number
    return float(mine.item())
