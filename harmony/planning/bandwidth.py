"""The host<->device copy rate a trainer plans with, measured once per device.

>>> rates = measured_bandwidth(torch.device("cpu"))
>>> sorted(rates)
['device->host', 'host->device']
"""

from __future__ import annotations

import time

import torch

__all__ = ["measured_bandwidth"]

_MEASURED: dict[str, dict[str, float]] = {}


def measured_bandwidth(device: torch.device) -> dict[str, float]:
    """Bytes/s of host<->device copies, measured once per device (64 MiB copies; freed
    at once, and covered by the fixed part of the bound on resident memory).

    On CUDA the host side is pinned as the host tier pins (:mod:`swap.pinned`, unpinned
    when the probe ends, never kept by PyTorch's caching host allocator), and the device
    block goes back to the caching allocator, which the trainer empties before it starts
    counting reserved bytes.
    """
    key = str(device)
    if key not in _MEASURED:
        n = 64 << 20
        if device.type == "cuda":
            from swap.pinned import PinnedAllocator

            src = PinnedAllocator()(n)
        else:
            src = torch.empty(n, dtype=torch.uint8)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        src.copy_(dst)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bw = 2 * n / max(time.perf_counter() - t0, 1e-9)
        _MEASURED[key] = {"host->device": bw, "device->host": bw}
    return _MEASURED[key]
