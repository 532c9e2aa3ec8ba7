"""The copies of one value (an activation, its gradient, a pack's gradients): :class:`Slot`.

A value has at most two copies: one on the device, which compute reads, and one at its home
(a tier's buffer or files on NVMe). Each copy keeps the handle of the copy filling it and the
link it travels on; each buffer goes back to its pool only once every copy that reads or
writes it is done (see :meth:`Slot.release_dev` and ``home_users``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import GroupHandle, Handle
from swap.tier import Tier

Value = tuple[torch.Tensor | None, ...]


def nbytes(value: Value) -> int:
    """Bytes of the tensors of ``value``.

    >>> nbytes((torch.zeros(2), None))
    8
    """
    return sum(t.numel() * t.element_size() for t in value if t is not None)


def all_of(handles: list[Handle]) -> Handle | None:
    """One handle done when all of ``handles`` are (None for none)."""
    return GroupHandle(list(handles)) if handles else None


@dataclass
class Slot:
    """The copies of one value: on the device and at its home, with the copies filling them.

    ``dev_bufs``/``home_bufs`` are pool buffers backing the copies (released to their tier);
    ``dev_charged`` counts device bytes of tensors compute produced (uncharged when freed).
    ``dev_ready`` is the copy filling the device copy, on link ``dev_link``, until compute
    waits for it; ``home_ready`` the copy filling the home copy, until the host reads it.
    ``home_users``: the handles of every copy that wrote or read ``home_bufs`` (its swap-out
    and each swap-in): the home buffers go back to their pool only once all are done, since a
    swap-in that compute merely waited for may still be reading them on a GPU. ``home_loc``:
    the tier holding ``home_bufs`` (or charged for ``home_keys``, the files of a value homed
    on NVMe).
    """

    dev: Value | None = None
    dev_bufs: list[torch.Tensor] = field(default_factory=list)
    dev_charged: int = 0
    dev_ready: Handle | None = None
    dev_link: str = ""
    home: Value | None = None
    home_bufs: list[torch.Tensor] = field(default_factory=list)
    home_ready: Handle | None = None
    home_users: list[Handle] = field(default_factory=list)
    home_loc: Loc = Loc.HOST
    single: bool = True
    home_keys: list[str] = field(default_factory=list)  # files of a value homed on NVMe
    outputs: Value | None = None  # S values: the forward's outputs, whose graph backward walks

    def wait_dev(self, engine: SwapEngine) -> None:
        """Order compute after the copy filling the device copy, if any."""
        if self.dev_ready is not None:
            engine.wait(self.dev_ready, self.dev_link)
            self.dev_ready = None

    def sync_home(self, engine: SwapEngine, link: str) -> None:
        """Make the host know the copy filling the home copy (on ``link``) has ended."""
        if self.home_ready is not None:
            engine.synchronize(self.home_ready, link)
            self.home_ready = None

    def release_dev(self, dev: Tier, after: Handle | None) -> None:
        """Give the value's device buffers back once ``after`` (a copy reading them) and the
        copy filling them, if nothing waited for it (a value loaded and never read), are done."""
        if self.dev_ready is not None:
            after = all_of([h for h in (after, self.dev_ready) if h is not None])
        for buf in self.dev_bufs:
            dev.release(buf, after=after)
        if self.dev_charged:
            dev.uncharge(self.dev_charged, after=after)
        self.dev, self.dev_bufs, self.dev_charged, self.dev_ready = None, [], 0, None
        self.outputs = None

    def release_home(self, tier: Tier) -> None:
        """Give the home buffers back to ``tier`` once every copy using them is done."""
        for buf in self.home_bufs:
            tier.release(buf, after=all_of(self.home_users))
