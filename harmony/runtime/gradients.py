"""Packs' gradients (G) during a step: :class:`Gradients`.

A pack's gradients are one flat buffer, zeroed on the device before its first backward of the
step; the layers' parameters' ``.grad`` are views of it (in mixed precision the pack adds each
micro-batch's gradients into it in fp32: ``Pack.grad_sink``). Between backwards the schedule
may store it where the pack's update runs (``update_loc``) and load it back; data parallelism
sums it over the ranks in place (whoever reads it first waits for that sum).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from harmony.runtime.hooks import DataParallelHooks
from harmony.runtime.pack import Pack
from harmony.runtime.slot import Slot
from schedules.simulate import link
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import Handle
from swap.tier import Tier


class Gradients:
    """Every pack's gradient buffer of the step, on the device and where its update runs.

    Args:
        packs: the packs. tiers: the tier of each location. engine: the swap engine.
        dp: this data-parallel rank's collectives (None: one process).

    Example::

        grads.new(p)                    # before pack p's first backward of the step
        grads.store(p, Loc.HOST)        # to where its update runs
        views = grads.views(p, Loc.HOST)
        grads.delete(p)                 # once its update read them
    """

    def __init__(self, packs: Sequence[Pack], tiers: dict[Loc, Tier], engine: SwapEngine,
                 dp: DataParallelHooks | None) -> None:
        self._packs, self._tiers, self._engine, self._dp = packs, tiers, engine, dp
        self._dev = tiers[Loc.DEVICE]
        self._slots: dict[int, Slot] = {}

    def __contains__(self, p: int) -> bool:
        return p in self._slots

    def _slot(self, p: int) -> Slot:
        return self._slots.setdefault(p, Slot())

    def _bind(self, p: int, flat: torch.Tensor | None) -> None:
        if self._packs[p].layout.mixed:  # gradients are added into flat in fp32 (Pack._mark)
            self._packs[p].grad_sink = flat
            return
        for e in self._packs[p].layout.trainable:
            e.tensor.grad = None if flat is None else e.view(flat)

    def new(self, p: int) -> None:
        """Zeroed gradients of pack ``p`` on the device, bound to its parameters."""
        pack = self._packs[p]
        buf = self._dev.allocate(pack.layout.g_bytes, f"gradients of pack {p}")
        buf.zero_()  # backward accumulates in place into these views (see Pack.got_grad)
        slot = self._slot(p)
        slot.dev, slot.dev_bufs = (buf,), [buf]
        self._bind(p, buf)

    def load(self, p: int, loc: Loc) -> None:
        """Start copying pack ``p``'s gradients from ``loc`` back to the device (``+G p``)."""
        slot = self._slot(p)
        assert slot.home is not None and slot.home[0] is not None
        slot.sync_home(self._engine, link(Loc.DEVICE, loc))
        buf = self._dev.allocate(self._packs[p].layout.g_bytes, f"gradients of pack {p}")
        name = link(loc, Loc.DEVICE)
        slot.dev_ready, slot.dev_link = self._engine.copy(buf, slot.home[0], name, "G"), name
        slot.home_users.append(slot.dev_ready)  # (reads the home buffer)
        slot.dev, slot.dev_bufs = (buf,), [buf]
        self._bind(p, buf)

    def store(self, p: int, loc: Loc) -> None:
        """Start copying pack ``p``'s gradients to ``loc``, where its update runs (``-G p``);
        the device buffer goes once the copy has read it."""
        slot = self._slot(p)
        self.wait_sum(p)  # the copy reads the summed gradients
        assert slot.dev is not None and slot.dev[0] is not None
        if not slot.home_bufs:
            slot.home_bufs = [self._tiers[loc].allocate(self._packs[p].layout.g_bytes,
                                                        f"gradients of pack {p} at {loc.value}")]
            slot.home, slot.home_loc = (slot.home_bufs[0],), loc
        assert slot.home is not None and slot.home[0] is not None
        slot.home_ready = self._engine.copy(slot.home[0], slot.dev[0], link(Loc.DEVICE, loc), "G")
        slot.home_users.append(slot.home_ready)
        self._bind(p, None)
        slot.release_dev(self._dev, after=slot.home_ready)

    def delete(self, p: int) -> None:
        """Free pack ``p``'s gradients wherever they are (``!G p``)."""
        slot = self._slots.pop(p, None)
        if slot is None:
            return
        self._bind(p, None)
        slot.release_dev(self._dev, after=None)
        slot.release_home(self._tiers[slot.home_loc])
        pack = self._packs[p]
        pack.got_grad = [False] * len(pack.got_grad)

    def wait_sum(self, p: int) -> None:
        """Data parallelism: wait for the sum of pack ``p``'s gradients over the ranks."""
        if self._dp is not None:
            self._dp.wait(p)

    def read(self, p: int) -> torch.Tensor:
        """Pack ``p``'s gradients on the device, once their load is done (a backward adds to
        them)."""
        slot = self._slots[p]
        if slot.dev is None or slot.dev[0] is None:
            raise AssertionError(f"G{p} is not on the device")
        slot.wait_dev(self._engine)
        return slot.dev[0]

    def device(self, p: int) -> torch.Tensor:
        """Pack ``p``'s gradient buffer on the device (for a collective summing it)."""
        slot = self._slots[p]
        assert slot.dev is not None and slot.dev[0] is not None
        return slot.dev[0]

    def flat(self, p: int, loc: Loc) -> torch.Tensor:
        """Pack ``p``'s flat gradients where its update, at ``loc``, reads them."""
        slot = self._slots[p]
        flat = slot.dev[0] if loc is Loc.DEVICE and slot.dev is not None \
            else slot.home[0] if slot.home is not None else None
        assert flat is not None, f"G{p} is not where its update runs"
        return flat

    def views(self, p: int, loc: Loc) -> list[torch.Tensor | None]:
        """Pack ``p``'s gradients where its update, at ``loc``, reads them, once they are
        summed over the ranks and there (None: a parameter that got no gradient)."""
        pack = self._packs[p]
        slot = self._slots[p]
        self.wait_sum(p)
        if loc is Loc.DEVICE:
            flat = slot.dev[0] if slot.dev is not None else None
            slot.wait_dev(self._engine)
        else:
            slot.sync_home(self._engine, link(Loc.DEVICE, Loc.HOST))
            flat = slot.home[0] if slot.home is not None else None
        assert flat is not None, f"G{p} is not where its update runs"
        return [e.gview(flat) if got else None
                for e, got in zip(pack.layout.trainable, pack.got_grad)]

    def at_home(self, p: int, loc: Loc) -> torch.Tensor:
        """Pack ``p``'s gradients stored at ``loc``, once the host may read them."""
        slot = self._slots[p]
        assert slot.home is not None and slot.home[0] is not None
        slot.sync_home(self._engine, link(Loc.DEVICE, loc))  # the host optimizer reads them
        return slot.home[0]

    def take_home(self, p: int) -> tuple[torch.Tensor, Handle | None]:
        """Pack ``p``'s gradients stored in host memory and the copy still filling them
        (its waiter is now the caller: an update that may run on another thread)."""
        slot = self._slots[p]
        assert slot.home is not None and slot.home[0] is not None
        taken = (slot.home[0], slot.home_ready)
        slot.home_ready = None
        return taken

    def live(self, p: int, i: int) -> torch.Tensor | None:
        """Pack ``p``'s gradient ``i`` wherever it is now (None: it got none), laid out as
        its weight."""
        pack = self._packs[p]
        if not pack.got_grad[i]:
            return None
        slot = self._slots[p]
        self.wait_sum(p)  # data parallelism: the sum over the ranks
        if slot.dev is not None and slot.dev[0] is not None:
            slot.wait_dev(self._engine)
            flat = slot.dev[0]
        else:  # stored behind: the host must see the bytes
            slot.sync_home(self._engine, link(Loc.DEVICE, slot.home_loc))
            assert slot.home is not None and slot.home[0] is not None, f"G{p} is nowhere"
            flat = slot.home[0]
        return pack.layout.trainable[i].view(flat)

    def device_buffers(self) -> list[torch.Tensor]:
        """The device buffers holding gradients."""
        return [b for s in self._slots.values() for b in s.dev_bufs]

    def abandon(self) -> None:
        """After a failed step: free every gradient buffer and unbind every gradient."""
        for p in list(self._slots):
            with contextlib.suppress(Exception):
                self.delete(p)
            self._slots.pop(p, None)
        for pack in self._packs:
            pack.grad_sink = None
            pack.got_grad = [False] * len(pack.got_grad)
            for e in pack.layout.trainable:
                e.tensor.grad = None
            for master in pack.masters:
                master.grad = None
