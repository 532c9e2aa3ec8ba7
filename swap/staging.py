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
from swap.handle import DoneHandle, Handle
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
    The copy to the device, started by a follow-up thread when the file read ends, waits only
    for the compute this thread issued before this call (a mark of its stream taken now), so
    compute issued meanwhile overlaps with the read and the copy.
    """
    if not dst.is_contiguous():
        raise ValueError(f"read_staged({key!r}): dst must be contiguous")
    n = dst.numel() * dst.element_size()
    staging = host.allocate(n, f"staging for {key}")
    engine.count("nvme->host", kind, n)
    ready = engine.mark()  # dst may have been read by compute issued so far
    read = store.read(key, staging)
    handle = engine.after(read, lambda: engine.copy(_flat_bytes(dst), staging, "host->device",
                                                    kind, ready=ready), "nvme->host")
    host.release(staging, after=handle)
    return handle


def write_staged(store: NvmeStore, engine: SwapEngine, host: Tier, key: str, src: torch.Tensor,
                 kind: str) -> Handle:
    """Start writing ``src`` (any device) as ``key`` through a host staging buffer.

    Counts ``device->host`` and ``host->nvme`` bytes of ``kind``. The caller keeps ``src``
    alive and unchanged until the returned handle is done (the copy to the host reads it);
    ``wait`` raises the write's error. The store knows ``key`` from this call on (its write is
    pending until the copy to the host is done): a read of it waits for the write, a delete
    removes the file once the write has ended (or skips the write), and a failed copy fails
    the write.
    """
    src = src.contiguous()
    n = src.numel() * src.element_size()
    pending = store.write_later(key, n)
    try:
        staging = host.allocate(n, f"staging for {key}")
    except BaseException as err:
        pending.fail(err)
        raise
    copied = engine.copy(staging, _flat_bytes(src), "device->host", kind)

    def write() -> Handle:
        try:
            copied.synchronize()  # the host must see the bytes before the disk gets them
        except BaseException as err:
            pending.fail(err)
            raise
        engine.count("host->nvme", kind, n)
        return pending.start(staging)

    # (``after`` a finished handle: the follow-up itself waits for the copy, so that a failed
    # copy also ends the pending write, which reads of the key wait for.)
    handle = engine.after(DoneHandle(), write, "host->nvme")
    host.release(staging, after=handle)
    return handle
