"""Randomness as a function of (seed, step, micro-batch, layer), never of execution order.

Each layer call runs inside :func:`layer_rng`, which seeds the CPU generator (and the CUDA one of
the compute device) from those four numbers and restores the caller's generator state after.
A backward's recompute therefore draws the same dropout masks as its forward, and every schedule
and placement draws the same masks. Plain PyTorch code that wants the same masks (a reference
run in a test, say) wraps its layer calls the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def layer_seed(seed: int, step: int, micro_batch: int, layer: int) -> int:
    """A 63-bit seed derived from the four numbers (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_batch}/{layer}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def generator_index(device: torch.device) -> int | None:
    """The CUDA generator a layer on ``device`` draws from: ``cuda:N`` -> N, ``cuda`` alone ->
    the current device (where its kernels run); None for a CPU device.

    >>> generator_index(torch.device("cpu")) is None
    True
    """
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def layer_rng(seed: int, step: int, micro_batch: int, layer: int,
              device: torch.device | str) -> Iterator[None]:
    """Run the body with generators seeded for this layer call, restoring them afterwards.

    Seeds the CPU generator and, for a CUDA ``device``, the generator of the GPU whose kernels
    the body runs (``generator_index``); the state saved and restored is that same
    generator's, so a layer on ``cuda:N`` never disturbs another GPU's generator. ``device``
    is a ``torch.device`` or its name (``"cpu"``, ``"cuda:1"``), as ``Trainer(device=)``
    takes it.

    Example::

        with harmony.layer_rng(seed, step, micro_batch, layer, torch.device("cuda", 1)):
            out = layer(x)   # dropout masks depend on the four numbers only
    """
    s = layer_seed(seed, step, micro_batch, layer)
    cpu_state = torch.get_rng_state()
    index = generator_index(torch.device(device))
    cuda_state = torch.cuda.get_rng_state(index) if index is not None else None
    torch.default_generator.manual_seed(s)
    if index is not None:
        torch.cuda.default_generators[index].manual_seed(s)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if index is not None and cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, index)
