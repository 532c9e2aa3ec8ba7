"""Sharded optimizer: a pack's updated weights sent from its owner rank into every other
rank's home copy (``*W p``; called by :class:`harmony.runtime.updates.UpdatePath`).

Weights homed in a tier's buffer are broadcast in place; the next use of the pack's weights
waits for the arrival (:func:`harmony.runtime.hooks.weights_arrived`), as does the trainer
before it reads or writes weights between steps. Weights homed on NVMe travel through host
memory: the owner sends the host copy its update wrote, the others receive into host memory
and write their file; this is waited for at once, so the host copies go back to the pool at
once (as the simulator assumes). A pack of several chunks goes chunk by chunk.
"""

from __future__ import annotations

import torch

from harmony.runtime.hooks import DataParallelHooks
from harmony.runtime.nvme_io import NvmeIO
from harmony.runtime.pack import Pack
from harmony.runtime.slot import all_of
from schedules.simulate import link
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import Handle
from swap.tier import Tier

READ, WRITE = link(Loc.NVME, Loc.HOST), link(Loc.HOST, Loc.NVME)


class Broadcast:
    """Sends packs' new weights between the ranks of a sharded optimizer.

    Args:
        dp: this rank's collectives. owners: the rank owning each pack's optimizer.
        engine: the swap engine. host: the host tier. io: the runtime's NVMe reads and writes.

    Example::

        broadcast.send(pack, sending)   # after the owner's update of pack (on every rank)
    """

    def __init__(self, dp: DataParallelHooks, owners: tuple[int, ...], engine: SwapEngine,
                 host: Tier, io: NvmeIO) -> None:
        self._dp, self._owners, self._engine, self._host, self._io = dp, owners, engine, host, io

    def owns(self, p: int) -> bool:
        """Whether this rank updates pack ``p``."""
        return self._owners[p] == self._dp.group.rank

    def send(self, pack: Pack, sending: tuple[torch.Tensor, Handle] | None) -> None:
        """Start sending ``pack``'s updated home weights from its owner into every other
        rank's home copy. ``sending``: a pack of one chunk homed on NVMe: the host copy of
        its new weights this rank's update wrote, and that write (None otherwise)."""
        p, dp, engine = pack.index, self._dp, self._engine
        if pack.home is not Loc.NVME:
            assert pack.home_w is not None

            def sent(read: Handle | None) -> None:
                # (the next update writes the home copy: the host must know that the copy
                # to a device buffer that the broadcast sent from has ended)
                if read is not None:
                    engine.synchronize(read, link(Loc.HOST, Loc.DEVICE))

            dp.start_broadcast(p, self._owners[p], pack.home_w, engine, sent)
            return
        if len(pack.chunks) > 1:  # (the update kept none of them)
            return self._send_chunks(pack)
        host = self._host
        if self.owns(p):
            assert sending is not None
            w, written = sending
            # (back to the pool once written to its file and read by the copy to the device)
            dp.start_broadcast(p, self._owners[p], w, engine, lambda read: host.release(
                w, after=all_of([h for h in (written, read) if h is not None])))
        else:
            buf = host.allocate(pack.layout.w_bytes, f"weights of pack {p}")

            def write(_: Handle | None) -> None:
                handle = self._io.write(pack.key("W", 0), buf, WRITE, "W")
                host.release(buf, after=handle)

            dp.start_broadcast(p, self._owners[p], buf, engine, write)
        dp.finish_broadcast(p)

    def _send_chunks(self, pack: Pack) -> None:
        """``pack``'s new weights chunk by chunk, one chunk in host memory at a time. The
        owner reads each chunk's file back (its update did not keep the weights); the others
        receive each into a host buffer and write their file. Frozen parameters did not
        change: not sent. Blocks until done."""
        p, dp, engine, host = pack.index, self._dp, self._engine, self._host
        owner = self._owners[p]
        sent: list[Handle | None] = []
        for c, chunk in enumerate(pack.chunks):
            if chunk.frozen:
                continue
            buf = host.allocate(chunk.w_bytes, f"weights of pack {p} (chunk {c})")
            key = pack.key("W", c)
            sent.clear()
            if self.owns(p):
                engine.synchronize(self._io.read(key, buf, READ, "W"), READ)
                dp.start_broadcast(p, owner, buf, engine, sent.append)
                dp.finish_broadcast(p)
            else:
                dp.start_broadcast(p, owner, buf, engine)
                dp.finish_broadcast(p)
                engine.synchronize(self._io.write(key, buf, WRITE, "W"), WRITE)
            # (the owner's copy to a device buffer, for NCCL, may still read it)
            host.release(buf, after=sent[0] if sent else None)
