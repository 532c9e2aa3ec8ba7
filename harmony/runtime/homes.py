"""Homes: where values and packs' weights live off the device, behind one interface.

A value (an activation or its gradient) or a pack's weights that are not on the device live at
their *home*: a buffer of a tier (the device's own, for a resident pack, or pinned host memory)
or files in the NVMe store. The runtime's owners do not ask which: they call the home of the
location the placement names (as FlexGen's ``TorchDevice`` and ``TorchDisk`` share ``allocate``
and ``copy``). :class:`TierHome` copies through the swap engine; :class:`FileHome` reads and
writes files through :class:`~harmony.runtime.nvme_io.NvmeIO`, a pack's weights one file per
chunk (:mod:`harmony.planning.chunks`).

What differs beyond reading and writing stays with the owner that does it: a pack homed on
NVMe is updated chunk by chunk through host memory (:mod:`harmony.runtime.chunked_update`),
and its weights are broadcast from host copies (:mod:`harmony.runtime.broadcast`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from harmony.model.buffers import buffer_values, copy_buffers
from harmony.model.layout import Entry
from harmony.runtime.nvme_io import NvmeIO
from harmony.runtime.pack import Pack
from harmony.runtime.slot import Slot
from schedules.simulate import link
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import GroupHandle, Handle
from swap.tier import Tier

BUFFERS = link(Loc.DEVICE, Loc.HOST)  # the link changed buffers travel home on


class Home(Protocol):
    """One location's way of holding values and packs' weights (see the module)."""

    @property
    def loc(self) -> Loc:
        """The location (device, host or NVMe)."""
        ...

    @property
    def stepped_at(self) -> Loc:
        """Where an update of a pack homed here leaves its new weights (host memory for
        files, which the update writes from there)."""
        ...

    def store_value(self, slot: Slot, what: str, key: str, src: torch.Tensor, name: str,
                    kind: str) -> tuple[torch.Tensor, Handle]:
        """Start copying tensor ``src`` of value ``what`` (on the device) home, recording
        the buffer or file in ``slot``; returns the home copy and the copy's handle."""
        ...

    def load_value(self, slot: Slot, i: int, dst: torch.Tensor, name: str,
                   kind: str) -> Handle:
        """Start copying tensor ``i`` of ``slot``'s home copy into ``dst`` on the device."""
        ...

    def free_value(self, slot: Slot) -> None:
        """Give ``slot``'s home buffers or files back, once the copies using them are done."""

    def load_weights(self, pack: Pack, dst: torch.Tensor, name: str,
                     buffers: Handle | None) -> Handle:
        """Start copying ``pack``'s weights into device buffer ``dst``; ``buffers``: the copy
        of the buffers its last forward changed, if still in flight."""
        ...

    def keep_buffers(self, pack: Pack, entries: list[Entry], src: torch.Tensor,
                     ) -> tuple[list[torch.Tensor] | None, Handle]:
        """Start carrying the buffers ``entries`` of device weights ``src`` home (or, for
        files, into host tensors returned, kept until the pack's update writes them)."""
        ...

    def write_entry(self, pack: Pack, entry: Entry, src: torch.Tensor, src_loc: Loc) -> None:
        """Write ``src`` (at ``src_loc``) as ``entry``'s value in ``pack``'s home weights
        (a tied copy, refreshed after its owner's update)."""


class TierHome:
    """A tier's buffers: values and weights are copied through the swap engine.

    Args:
        loc: the tier's location. tier: the tier. engine: the swap engine.
    """

    def __init__(self, loc: Loc, tier: Tier, engine: SwapEngine) -> None:
        self.loc, self.stepped_at, self._tier, self._engine = loc, loc, tier, engine

    def store_value(self, slot: Slot, what: str, key: str, src: torch.Tensor, name: str,
                    kind: str) -> tuple[torch.Tensor, Handle]:
        buf = self._tier.allocate(src.numel() * src.element_size(), f"{what} at {self.loc.value}")
        view = buf.view(src.dtype).view(src.shape)
        handle = self._engine.copy(view, src, name, kind)
        slot.home_bufs.append(buf)
        return view, handle

    def load_value(self, slot: Slot, i: int, dst: torch.Tensor, name: str,
                   kind: str) -> Handle:
        src = slot.home[i] if slot.home is not None else None
        assert src is not None
        handle = self._engine.copy(dst, src, name, kind)
        slot.home_users.append(handle)  # (reads the home buffer)
        return handle

    def free_value(self, slot: Slot) -> None:
        slot.release_home(self._tier)

    def load_weights(self, pack: Pack, dst: torch.Tensor, name: str,
                     buffers: Handle | None) -> Handle:
        assert pack.home_w is not None
        if buffers is not None:  # (the home copy's buffers as the last forward left them)
            self._engine.wait(buffers, BUFFERS)
        return self._engine.copy(dst, pack.home_w, name, "W")

    def keep_buffers(self, pack: Pack, entries: list[Entry], src: torch.Tensor,
                     ) -> tuple[list[torch.Tensor] | None, Handle]:
        assert pack.home_w is not None
        return None, copy_buffers(entries, src, pack.home_w, self._engine, BUFFERS)

    def write_entry(self, pack: Pack, entry: Entry, src: torch.Tensor, src_loc: Loc) -> None:
        assert pack.home_w is not None
        self._engine.host_write(entry.view(pack.home_w),
                                f"the tied copy in pack {pack.index}'s home weights")
        entry.view(pack.home_w).copy_(src)
        if src_loc is not pack.home:
            self._engine.count(link(src_loc, pack.home), "W", entry.nbytes)


class FileHome:
    """Files in the NVMe store: a value's tensors one file each, a pack's weights one file per
    chunk; bytes pass through host memory (lent by the host tier) where the host touches them.

    Args:
        io: the runtime's NVMe reads and writes. tier: the NVMe tier (charged for values'
            files). host: the host tier. engine: the swap engine.
    """

    loc = Loc.NVME
    stepped_at = Loc.HOST

    def __init__(self, io: NvmeIO, tier: Tier, host: Tier, engine: SwapEngine) -> None:
        self._io, self._tier, self._host, self._engine = io, tier, host, engine

    def store_value(self, slot: Slot, what: str, key: str, src: torch.Tensor, name: str,
                    kind: str) -> tuple[torch.Tensor, Handle]:
        handle = self._io.write(key, src, name, kind)
        self._tier.charge(src.numel() * src.element_size(), f"{what} on NVMe")
        slot.home_keys.append(key)
        return torch.empty(src.shape, dtype=src.dtype, device="meta"), handle

    def load_value(self, slot: Slot, i: int, dst: torch.Tensor, name: str,
                   kind: str) -> Handle:
        return self._io.read(slot.home_keys[i], dst, name, kind)

    def free_value(self, slot: Slot) -> None:
        for key, t in zip(slot.home_keys, [t for t in slot.home or () if t is not None]):
            self._io.delete(key)  # (a failed write left no file; a file goes once written)
            self._tier.uncharge(t.numel() * t.element_size())

    def load_weights(self, pack: Pack, dst: torch.Tensor, name: str,
                     buffers: Handle | None) -> Handle:
        # each chunk's file into its slice (changed buffers are restored after the load)
        return GroupHandle([self._io.read(pack.key("W", c.index), dst[c.w[0]:c.w[1]], name, "W")
                            for c in pack.chunks])

    def keep_buffers(self, pack: Pack, entries: list[Entry], src: torch.Tensor,
                     ) -> tuple[list[torch.Tensor] | None, Handle]:
        return buffer_values(entries, src, self._engine, BUFFERS, pin=self._host.pin)

    def write_entry(self, pack: Pack, entry: Entry, src: torch.Tensor, src_loc: Loc) -> None:
        # The file of the chunk holding the entry is rewritten with the new slice (the read
        # waits in the store for a write of that file still in flight: the sharer's own
        # update may have just written it).
        chunk = pack.chunk_of(entry)
        key = pack.key("W", chunk.index)
        buf = self._host.allocate(chunk.w_bytes, f"weights of pack {pack.index} (tied copy)")
        self._engine.synchronize(self._io.read(key, buf, link(Loc.NVME, Loc.HOST), "W"),
                                 link(Loc.NVME, Loc.HOST))
        entry.view(buf, chunk.w[0]).copy_(src)
        handle = self._io.write(key, buf, link(Loc.HOST, Loc.NVME), "W")
        self._host.release(buf, after=handle)


def homes(tiers: dict[Loc, Tier], engine: SwapEngine, io: NvmeIO) -> dict[Loc, Home]:
    """The home of every location of ``tiers`` (NVMe only where there is a store)."""
    out: dict[Loc, Home] = {loc: TierHome(loc, tiers[loc], engine)
                            for loc in (Loc.DEVICE, Loc.HOST)}
    if Loc.NVME in tiers and io.store is not None:
        out[Loc.NVME] = FileHome(io, tiers[Loc.NVME], tiers[Loc.HOST], engine)
    return out
