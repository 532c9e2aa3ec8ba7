"""Packs' weights on the device: :class:`DeviceWeights`.

A pack homed off the device is loaded into a device buffer for its forwards and backwards
(``+W p``) and freed after (``~W p``); compute waits for the load only where it reads the
weights. The buffers a forward changes (BatchNorm's running statistics) are carried from the
device copy to the home copy after each forward whose changes count, or, for a pack homed on
NVMe, into host tensors kept until its update writes them (:mod:`harmony.model.buffers`).
Everything the runtime keeps about one pack's device copy is one :class:`DeviceCopy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import torch

from harmony.model.buffers import load_buffers
from harmony.model.layout import Entry
from harmony.runtime.homes import BUFFERS, Home
from harmony.runtime.hooks import DataParallelHooks, weights_arrived
from harmony.runtime.pack import Pack
from harmony.runtime.slot import all_of
from harmony.runtime.update_worker import UpdateWorker
from schedules.simulate import link
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import Handle
from swap.tier import Tier


@dataclass
class DeviceCopy:
    """One pack's weights on the device, and its changed buffers on their way home.

    ``buf``: the device copy (None: not loaded); ``ready``: its load, until compute waits for
    it. ``changed``: a pack homed on NVMe: the buffers this step's forward changed, in host
    memory until its update writes them; ``changed_copy``: the copy of the changed buffers to
    the home copy (or into ``changed``) until the step ends, waited for before a forward changes
    them again, before the next load reads the home copy, or before the host reads them.
    ``home_read``: the last load, which reads the home copy, until the host knows it ended.
    """

    buf: torch.Tensor | None = None
    ready: Handle | None = None
    changed: list[torch.Tensor] | None = None
    changed_copy: Handle | None = None
    home_read: Handle | None = None


class DeviceWeights:
    """The device copies of the packs' weights.

    Args:
        packs: the packs. homes: the home of each location. dev: the device tier.
        engine: the swap engine. dp: this data-parallel rank's collectives (a sharded
        optimizer's broadcast fills the home copy). worker: the update worker, whose step of a
        pack its next load waits for (None: updates run in line).
        changing: ids of the buffers a forward changes (None: every buffer).

    Example::

        weights.load(p)      # +W p
        weights.wait(p)      # before compute reads them
        weights.free(p)      # ~W p
    """

    def __init__(self, packs: Sequence[Pack], homes: Mapping[Loc, Home], dev: Tier,
                 engine: SwapEngine, dp: DataParallelHooks | None, worker: UpdateWorker | None,
                 changing: Set[int] | None) -> None:
        self._packs, self._homes, self._dev, self._engine = packs, homes, dev, engine
        self._dp, self._worker, self._changing = dp, worker, changing
        self._copies = [DeviceCopy() for _ in packs]

    def load(self, p: int) -> None:
        """Start copying pack ``p``'s weights from its home to a device buffer, and bind its
        layers to it (compute waits for the copy in :meth:`wait`)."""
        weights_arrived(self._dp, p)
        if self._worker is not None:  # (its update, in flight, writes the home copy)
            self._worker.join(p)
        pack, copy = self._packs[p], self._copies[p]
        buf = self._dev.allocate(pack.layout.w_bytes, f"weights of pack {p}")
        name = link(pack.home, Loc.DEVICE)
        copy.ready = self._homes[pack.home].load_weights(pack, buf, name, copy.changed_copy)
        copy.home_read = copy.ready
        copy.buf = buf
        pack.layout.bind(buf)

    def free(self, p: int) -> None:
        """Unbind pack ``p``'s layers and give its device buffer back once the copies reading
        or filling it are done."""
        pack, copy = self._packs[p], self._copies[p]
        pack.layout.bind(None)
        buf, ready = copy.buf, copy.ready
        assert buf is not None, f"W{p} is not on the device"
        copy.buf = copy.ready = None
        # (the copy of the buffers a forward changed may still read it)
        self._dev.release(buf, after=all_of([h for h in (ready, copy.changed_copy) if h]))

    def wait(self, p: int) -> None:
        """Order compute that reads pack ``p``'s weights after their load (and the changed
        buffers restored into it) and after the last copy of its changed buffers."""
        weights_arrived(self._dp, p)  # (weights homed on the device are read in place)
        copy = self._copies[p]
        if copy.changed_copy is not None:  # (a forward changes them: not before it was read)
            self._engine.wait(copy.changed_copy, BUFFERS)
        handle, copy.ready = copy.ready, None
        if handle is not None:
            self._engine.wait(handle, link(self._packs[p].home, Loc.DEVICE))
            if copy.changed is not None:  # the file has the buffers of before this forward
                assert copy.buf is not None
                name = link(Loc.HOST, Loc.DEVICE)
                self._engine.wait(load_buffers(self.changing(p), copy.changed, copy.buf,
                                               self._engine, name), name)

    def changing(self, p: int) -> list[Entry]:
        """Pack ``p``'s buffers that a forward changes (all of them if nobody said)."""
        buffers = self._packs[p].layout.buffers
        if self._changing is None:
            return buffers
        return [e for e in buffers if id(e.tensor) in self._changing]

    def keep_buffers(self, p: int) -> None:
        """Make the buffer updates of a forward count: carry them from the device copy of the
        weights to the home copy (a pack homed on NVMe keeps them in host memory until its
        update writes its weights)."""
        pack, copy = self._packs[p], self._copies[p]
        buffers = self.changing(p)
        if not buffers or pack.home is Loc.DEVICE:  # (bound to the home copy)
            return
        assert copy.buf is not None
        # (an earlier copy of this step is on the same link: the new one's end implies it)
        changed, copy.changed_copy = self._homes[pack.home].keep_buffers(pack, buffers,
                                                                         copy.buf)
        if changed is not None:
            copy.changed = changed

    def settle_buffers(self, p: int) -> None:
        """Make the host know the copy of pack ``p``'s changed buffers has ended, if any."""
        copy = self._copies[p]
        if copy.changed_copy is not None:
            handle, copy.changed_copy = copy.changed_copy, None
            self._engine.synchronize(handle, BUFFERS)

    def settle_home(self, p: int) -> None:
        """Make the host know pack ``p``'s last load from its home copy has ended, before
        something other than its update writes that copy (a sharded optimizer's broadcast
        arriving from the pack's owner)."""
        copy = self._copies[p]
        if copy.home_read is not None:
            handle, copy.home_read = copy.home_read, None
            self._engine.synchronize(handle, link(self._packs[p].home, Loc.DEVICE))

    def take_changed(self, p: int) -> tuple[list[torch.Tensor] | None, Handle | None]:
        """Pack ``p``'s changed buffers held in host memory and their copy there, handed to
        its update, which writes them (None, None: none)."""
        copy = self._copies[p]
        taken = (copy.changed, copy.changed_copy)
        copy.changed = copy.changed_copy = None
        return taken

    def write_entry(self, p: int, entry: Entry, src: torch.Tensor, src_loc: Loc) -> None:
        """Write ``src`` (at ``src_loc``) as ``entry``'s value in pack ``p``'s device copy,
        if one is loaded (a tied copy, refreshed after its owner's update)."""
        copy = self._copies[p]
        if copy.buf is None:
            return
        self.wait(p)  # (its load must not land after this write)
        self._engine.host_write(entry.view(copy.buf),
                                f"the tied copy in pack {p}'s loaded weights")
        entry.view(copy.buf).copy_(src)
        if src_loc is not Loc.DEVICE:
            self._engine.count(link(src_loc, Loc.DEVICE), "W", entry.nbytes)

    def device_buffers(self) -> list[torch.Tensor]:
        """The device buffers holding loaded weights."""
        return [c.buf for c in self._copies if c.buf is not None]

    def end_step(self) -> None:
        """The step's device work is done: no copy of changed buffers or load is in flight."""
        for copy in self._copies:
            copy.changed_copy = copy.home_read = None

    def abandon(self) -> None:
        """After a failed step: free every device copy and forget changed buffers (the home
        copies keep the weights of before the step)."""
        for p, copy in enumerate(self._copies):
            if copy.buf is not None:
                self.free(p)
        for copy in self._copies:
            copy.changed = copy.changed_copy = copy.home_read = None
