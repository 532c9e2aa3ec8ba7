"""``harmony env``: what this machine gives harmony, in the manner of DeepSpeed's ``ds_report``.

It prints torch's and CUDA's versions, the GPUs and their memory, whether pinned (page-locked)
host memory works, each NVMe backend's availability (DeepSpeed's async I/O op: built or not,
found without compiling anything; O_DIRECT in a directory given with ``--nvme-dir``), DeepSpeed's
CPU Adam op, host memory and how malloc is set, and the budgets' defaults. Nothing is built
unless ``--build-aio`` asks, which builds the async I/O op (minutes) and says so first.

    harmony env
    harmony env --nvme-dir /mnt/nvme
    harmony env --build-aio
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import importlib.metadata
import importlib.util
import platform
import sys
import tempfile
from pathlib import Path

import torch

from harmony.runtime.host_memory import available_bytes, bound_malloc
from harmony.training.config import TrainerConfig
from swap.aio import BUILD_HINT, AioUnavailable, built_op, find_aio, load_aio_op
from swap.direct_io import odirect_refusal
from swap.tier import fmt_bytes


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, {fmt_bytes(p.total_memory)}, compute capability "
                   f"{p.major}.{p.minor}")
    return out


def _pinned() -> str:
    if not torch.cuda.is_available():
        return "not used (no CUDA device: host buffers are plain memory)"
    try:
        buf = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as err:
        return f"does not work ({str(err).splitlines()[0]}): check the memlock limit (ulimit -l)"
    return "works (1 MiB page-locked)" if buf.is_pinned() else "allocation not page-locked"


def _aio() -> str:
    where = find_aio()
    if where is None:
        libaio = ctypes.util.find_library("aio")
        dev = Path("/usr/include/libaio.h").is_file()
        return (f"not built; {BUILD_HINT} (libaio library {'found' if libaio else 'missing'}, "
                f"headers {'found' if dev else 'missing: apt-get install libaio-dev'})")
    try:
        load_aio_op(build=False)
    except AioUnavailable as err:
        return f"built at {where} but unusable: {err}"
    return f"built ({where}), loads"


def _odirect(nvme_dir: str | None) -> str:
    if nvme_dir is None:
        return "give --nvme-dir DIR to probe it there"
    d = Path(nvme_dir)
    if not d.is_dir():
        return f"{d} is not a directory"
    try:
        with tempfile.TemporaryDirectory(dir=d, prefix=".harmony-env-") as tmp:
            refusal = odirect_refusal(Path(tmp), 4096)
    except OSError as err:
        return f"cannot write in {d}: {err.strerror}"
    if refusal is None:
        return f"works in {d}"
    return f"refused by {refusal} at {d}: buffered I/O threads (the page cache) instead"


def _cpu_adam() -> str:
    if importlib.util.find_spec("deepspeed") is None:
        return "unavailable: DeepSpeed is not installed (pip install deepspeed)"
    so = built_op("cpu_adam")
    if so is not None:
        return f"built ({so.parent}); harmony.optim.deepspeed_cpu_adam() uses it"
    return ("not built; harmony.optim.deepspeed_cpu_adam() builds it on first use (a few "
            "minutes, said when it starts)")


def _defaults() -> list[str]:
    """The defaults of the settings that concern this machine (TrainerConfig's fields)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    names = ("device_memory", "host_memory", "nvme_dir", "nvme_backend", "update_chunk",
             "overlap_updates", "precision", "micro_batch_size")
    return [f"{n}={defaults[n]!r}" for n in names if n in defaults]


def _version() -> str:
    """harmony's installed version (the package metadata; "unknown" outside an install)."""
    try:
        return importlib.metadata.version("harmony")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def report(nvme_dir: str | None = None) -> str:
    """The ``harmony env`` text (see the module's text); builds nothing."""
    cuda = (f"CUDA {torch.version.cuda}, available" if torch.cuda.is_available()
            else f"built with CUDA {torch.version.cuda}, no device visible"
            if torch.version.cuda else "CPU-only build")
    lines = [
        f"harmony {_version()} at {Path(__file__).resolve().parents[1]}",
        f"python {platform.python_version()} ({sys.executable}), {platform.platform()}",
        f"torch {torch.__version__} ({cuda})",
        "GPUs: " + ("; ".join(_gpus()) or "none"),
        f"pinned host memory: {_pinned()}",
        f"host memory: {fmt_bytes(available_bytes())} available; malloc: {bound_malloc()}",
        "NVMe backends (nvme_backend='auto' takes the first that works, and builds nothing):",
        f"  aio       DeepSpeed async I/O: {_aio()}",
        f"  odirect   O_DIRECT threads: {_odirect(nvme_dir)}",
        "  buffered  buffered I/O threads: always",
        f"CPU Adam (DeepSpeed): {_cpu_adam()}",
        "Trainer defaults: " + ", ".join(_defaults()) + " (None: no limit)",
        "budgets bound the process: resident memory stays within 1.10 x (host_memory + "
        "device_memory) + 256 MiB above the model's construction (README, 'Budgets')",
    ]
    return "\n".join(lines)


def build_aio() -> str:
    """Build DeepSpeed's async I/O op (minutes; logged before it starts) or load the built
    one; returns a line saying which. Raises AioUnavailable with the reason it cannot."""
    where = find_aio()
    if where is not None:
        load_aio_op(build=False)
        return f"DeepSpeed async I/O op already built ({where}); nothing to do"
    print("building DeepSpeed's async I/O op; this may take several minutes...", flush=True)
    load_aio_op(build=True)
    return f"DeepSpeed async I/O op built ({find_aio()}); nvme_backend='auto' now uses it"
