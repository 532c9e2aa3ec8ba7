"""NVMe <-> GPU through a host staging buffer, without blocking the host thread.

The NVMe store reads and writes CPU memory only, so a GPU tensor's bytes cross two links: a file
read into a (pinned) host staging buffer, then a copy to the device on the link's copy stream;
or a copy to the host, then a file write. Each pair is chained with
:meth:`swap.engine.SwapEngine.after`, so the host thread that issues compute never waits for the
disk: it waits only where a consumer needs the bytes (``wait`` on the returned handle, which on
CUDA makes the compute stream wait on the copy's event).

The staging buffer is allocated from the host tier (so it counts against ``host_memory``) and
goes back to its pool when the second hop is done. On CPU the device tier is host memory and the
store reads and writes it directly; these functions serve any device, which is how they are
tested without a GPU.
"""

from __future__ import annotations

import torch

from swap.engine import SwapEngine
from swap.handle import Handle
from swap.nvme import NvmeStore
from swap.tier import Tier


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 view (``t`` must be contiguous)."""
    return t.reshape(-1).view(torch.uint8)


def read_staged(store: NvmeStore, engine: SwapEngine, host: Tier, key: str, dst: torch.Tensor,
                kind: str) -> Handle:
    """Start reading ``key`` into ``dst`` (any device) through a host staging buffer.

    Counts ``nvme->host`` and ``host->device`` bytes of ``kind``. The caller keeps ``dst``
    alive and untouched until the returned handle is done; ``wait`` raises the read's error.
    """
    if not dst.is_contiguous():
        raise ValueError(f"read_staged({key!r}): dst must be contiguous")
    n = dst.numel() * dst.element_size()
    staging = host.allocate(n, f"staging for {key}")
    engine.count("nvme->host", kind, n)
    read = store.read(key, staging)
    handle = engine.after(read, lambda: engine.copy(_flat_bytes(dst), staging, "host->device",
                                                    kind), "nvme->host")
    host.release(staging, after=handle)
    return handle


def write_staged(store: NvmeStore, engine: SwapEngine, host: Tier, key: str, src: torch.Tensor,
                 kind: str) -> Handle:
    """Start writing ``src`` (any device) as ``key`` through a host staging buffer.

    Counts ``device->host`` and ``host->nvme`` bytes of ``kind``. The caller keeps ``src``
    alive and unchanged until the returned handle is done (the copy to the host reads it);
    ``wait`` raises the write's error. The store learns of ``key`` only when the copy to the
    host is done, so a read of ``key`` waits for this handle first.
    """
    src = src.contiguous()
    n = src.numel() * src.element_size()
    staging = host.allocate(n, f"staging for {key}")
    copied = engine.copy(staging, _flat_bytes(src), "device->host", kind)

    def write() -> Handle:
        engine.count("host->nvme", kind, n)
        return store.write(key, staging)

    handle = engine.after(copied, write, "host->nvme")
    host.release(staging, after=handle)
    return handle
