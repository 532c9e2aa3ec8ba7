"""Module buffers a forward pass changes (BatchNorm's running statistics and counters).

A layer's buffers live in its pack's flat weights, so a forward that updates them in place
updates whichever copy the layer is bound to: the device copy while the pack is swapped in, or
the home copy of a resident pack. Plain PyTorch updates them once per micro-batch's forward;
harmony must do the same although it may run a pack's forward twice (recompute in backward)
and although device copies of weights are never written back. So:

* after a forward whose changes must count, :func:`copy_buffers` carries the buffers from the
  device copy to the home copy (or to a host copy kept until an NVMe pack's update writes them);
* a recompute runs under :func:`buffers_unchanged`, which restores them afterwards.

Only buffers a forward was seen to change while profiling are handled (most buffers, such as
position ids, rotary frequencies or causal masks, never change): the functions take those
entries, so a model without such buffers pays nothing per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from harmony.layout import Entry


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


def copy_buffers(buffers: list[Entry], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the buffers' bytes from flat weights ``src`` to flat weights ``dst`` (same layout;
    any devices; synchronous: buffers are small)."""
    for e in buffers:
        e.view(dst).copy_(e.view(src))


def buffer_values(buffers: list[Entry], src: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies of the buffers held in flat weights ``src``."""
    return [e.view(src).to("cpu", copy=True) for e in buffers]


def restore_buffers(buffers: list[Entry], values: list[torch.Tensor],
                    dst: torch.Tensor, base: int = 0) -> None:
    """Write :func:`buffer_values` back into flat weights ``dst`` (a piece of the flat
    weights starting at byte ``base``, if given: see :meth:`Entry.view`)."""
    for e, v in zip(buffers, values):
        e.view(dst, base).copy_(v)
