"""Module buffers a forward pass changes (BatchNorm's running statistics and counters).

A layer's buffers live in its pack's flat weights, so a forward that updates them in place
updates whichever copy the layer is bound to: the device copy while the pack is swapped in, or
the home copy of a resident pack. Plain PyTorch updates them once per micro-batch's forward;
harmony must do the same although it may run a pack's forward twice (recompute in backward)
and although device copies of weights are never written back. So:

* after a forward whose changes must count, :func:`copy_buffers` carries the buffers from the
  device copy to the home copy (or :func:`buffer_values` to a host copy kept until an NVMe
  pack's update writes them, from which :func:`load_buffers` restores a reloaded device copy);
* a recompute runs under :func:`buffers_unchanged`, which restores them afterwards.

The copies between the device and the host are asynchronous, through the swap engine: the
functions return their handle, which the runtime keeps with the pack and waits for where the
bytes are used next (before the pack's next forward changes them again, before its next load
reads the home copy, before the host reads them; see
:class:`harmony.runtime.weights.DeviceWeights`).

Only buffers a forward was seen to change while profiling are handled (most buffers, such as
position ids, rotary frequencies or causal masks, never change): the functions take those
entries, so a model without such buffers pays nothing per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from harmony.model.layout import Entry
from swap.engine import SwapEngine
from swap.handle import GroupHandle, Handle


@contextlib.contextmanager
def buffers_unchanged(buffers: list[Entry]) -> Iterator[None]:
    """Restore ``buffers`` to their values on entry when the body ends."""
    if not buffers:
        yield
        return
    saved = [e.tensor.detach().clone() for e in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for e, value in zip(buffers, saved):
                e.tensor.copy_(value)


def copy_buffers(buffers: list[Entry], src: torch.Tensor, dst: torch.Tensor,
                 engine: SwapEngine, link: str) -> Handle:
    """Start copying the buffers' bytes from flat weights ``src`` to flat weights ``dst``
    (same layout) on ``link``; both stay untouched until the returned handle is done.

    >>> from harmony.model.layout import Layout
    >>> from swap.stats import Stats
    >>> e = Layout([torch.nn.BatchNorm1d(2)]).buffers[0]
    >>> src, dst = torch.ones(1024, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)
    >>> engine = SwapEngine(torch.device("cpu"), Stats())
    >>> copy_buffers([e], src, dst, engine, "device->host").synchronize(); engine.close()
    """
    return GroupHandle([engine.copy(e.view(dst), e.view(src), link, "W") for e in buffers])


def buffer_values(buffers: list[Entry], src: torch.Tensor, engine: SwapEngine, link: str,
                  pin: bool = False) -> tuple[list[torch.Tensor], Handle]:
    """Start copying the buffers held in flat weights ``src`` into new CPU tensors (pinned
    if ``pin``, for a GPU's asynchronous copies); returns them and the copies' handle, which
    the host synchronizes before it reads them."""
    values = [torch.empty(e.shape, dtype=e.dtype, pin_memory=pin) for e in buffers]
    return values, GroupHandle([engine.copy(v, e.view(src), link, "W")
                                for e, v in zip(buffers, values)])


def load_buffers(buffers: list[Entry], values: list[torch.Tensor], dst: torch.Tensor,
                 engine: SwapEngine, link: str) -> Handle:
    """Start copying :func:`buffer_values` into flat weights ``dst`` on ``link``."""
    return GroupHandle([engine.copy(e.view(dst), v, link, "W")
                        for e, v in zip(buffers, values)])


def restore_buffers(buffers: list[Entry], values: list[torch.Tensor],
                    dst: torch.Tensor, base: int = 0) -> None:
    """Write :func:`buffer_values` back into host flat weights ``dst`` (a piece of the flat
    weights starting at byte ``base``, if given: see :meth:`Entry.view`), on the host."""
    for e, v in zip(buffers, values):
        e.view(dst, base).copy_(v)
