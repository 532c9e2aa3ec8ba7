"""The update of a pack homed on NVMe, streamed through host memory one chunk at a time.

A pack on NVMe is split into chunks of whole parameters (:mod:`harmony.planning.chunks`), each with
its own files. Its update reads a chunk's weights, fp32 masters (mixed precision) and optimizer
state into host buffers, steps the optimizer on that chunk's parameters alone (a torch
optimizer skips parameters whose ``.grad`` is None, so only the chunk's get gradients), and
writes the chunk back, with the next chunk's reads and the last ones' writes in flight:

             backward of p | update of p                           | next pack's backward
    read     c0 c1         |     c2       c3       c4              |
    step                   | c0       c1       c2       c3      c4 |
    write                  |    c0 ------ c1 ----- c2 ----- c3 ----|- c4 ---

Frozen parameters (their chunk, the last) never change: an update neither reads nor writes
them. The first two chunks' reads are issued by :meth:`ChunkedUpdate.stage` while the pack's
backward runs (a pack of one chunk is the whole-pack update: all of it read behind the
backward, written behind the next one). Before chunk i steps, chunk i+1's read is issued,
once chunk i-2's writes are done and its buffers are back in the pool: at most ``WINDOW``
(3) chunks are in host memory, one being read, one stepping, one being written. Each chunk's
buffers go back at that fixed point (not as soon as its writes end), so the host bytes held
follow the simulator's model (:func:`schedules.simulate.simulate`) whatever the disk's speed;
the last three chunks' buffers go back as their writes end, behind the next pack's backward.

What waits for what: a chunk's step waits for its reads (``engine.synchronize``, counted as
``nvme->host`` stall); a read waits for the write of chunk i-2 (``host->nvme`` stall); the step
that wrote a chunk ends only once every write is on disk
(:meth:`harmony.runtime.runtime.Runtime.run`); a read of a chunk's file issued later (the next
load of the weights) waits in the store for its write.

With ``Trainer(overlap_updates=True)`` :meth:`ChunkedUpdate.run` runs on the update worker
(:mod:`harmony.runtime.update_worker`), behind the next pack's backward.
:meth:`ChunkedUpdate.prepare` first takes what it reads (the gradients, the changed buffers) from
their owners on the runtime's thread, and :meth:`ChunkedUpdate.reserve` charges its host bytes up
front, so that on the worker it touches nothing the runtime's thread uses but the store, the
engine's counters and its reservation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harmony.model.buffers import restore_buffers
from harmony.planning.chunks import Chunk
from harmony.runtime.gradients import Gradients
from harmony.runtime.nvme_io import NvmeIO
from harmony.runtime.pack import Pack
from harmony.runtime.tied import TiedCopies
from harmony.runtime.weights import DeviceWeights
from schedules.simulate import link
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import GroupHandle, Handle
from swap.tier import OutOfCapacity, Reservation, Tier

WINDOW = 3  # chunks in host memory at most: being read, stepping, being written
STAGED = 2  # chunks read while the pack's backward runs (the first, and the next one)

READ, WRITE = link(Loc.NVME, Loc.HOST), link(Loc.HOST, Loc.NVME)


@dataclass
class _Held:
    """One chunk's host buffers during an update, and the I/O filling or emptying them."""

    chunk: Chunk
    w: torch.Tensor                 # its weights (the masters too, in fp32)
    m: torch.Tensor | None          # mixed precision: its fp32 masters
    k: torch.Tensor | None          # its optimizer state (None: none laid out yet)
    estimate: int                   # bytes charged for state its step will create
    reads: list[Handle]
    writes: list[Handle] = field(default_factory=list)

    def buffers(self) -> list[torch.Tensor]:
        return [b for b in (self.w, self.m, self.k) if b is not None]


class ChunkedUpdate:
    """The update of NVMe-homed pack ``p``, streamed chunk by chunk (see the module's text).

    Args:
        pack: the pack. host: the host tier. io: the runtime's NVMe reads and writes.
        engine: the swap engine. grads: the packs' gradients. weights: the packs' device
        copies (the buffers the pack's forward changed). ties: tied weights, whose copies
        each chunk's new weights refresh (None: none).
        keep: with a sharded optimizer, receives the host weights of a pack of one chunk,
            and their write, kept for the broadcast (None: no broadcast).

    Use: :meth:`stage` while the pack's backward runs (optional), then :meth:`prepare` and
    :meth:`run` once its gradients are complete, and :meth:`finish`; :meth:`abandon` after a
    failure.

    Example::

        update = ChunkedUpdate(pack, host, io, engine, grads, weights, None)
        update.stage()      # behind the backward
        update.prepare(); update.run(); update.finish()
    """

    def __init__(self, pack: Pack, host: Tier, io: NvmeIO, engine: SwapEngine,
                 grads: Gradients, weights: DeviceWeights, ties: TiedCopies | None,
                 keep: Callable[[torch.Tensor, Handle], None] | None = None) -> None:
        self.p, self.pack, self.host = pack.index, pack, host
        self._io, self._engine, self._grads, self._weights = io, engine, grads, weights
        self._ties, self._keep = ties, keep
        # where the chunks' buffers come from: the host tier, or (on the update worker) a
        # reservation of it made by :meth:`reserve`
        self.mem: Tier | Reservation = self.host
        self.held: dict[int, _Held] = {}
        self.next = 0  # the next chunk to read
        self.grads: tuple[torch.Tensor, Handle | None] | None = None  # (G, its copy home)
        self.new_buffers: list[torch.Tensor] | None = None  # buffers this step's forward set
        self.buffers_ready: Handle | None = None  # their copy to the host
        self.on_worker = False
        # the chunks an update streams: all but the frozen parameters' (always the last)
        self.count = sum(1 for c in self.pack.chunks if not c.frozen)

    def stage(self) -> None:
        """Start reading the first chunks; the update waits for them."""
        while self.next < min(STAGED, self.count):
            self._read()

    def prepare(self) -> None:
        """On the runtime's thread, once the pack's gradients are complete: take what the
        update reads from their owners (its gradients, the buffers its forward changed)."""
        self.grads = self._grads.take_home(self.p)  # (their copy home: waited for by run())
        self.new_buffers, self.buffers_ready = self._weights.take_changed(self.p)

    def chunk_bytes(self, c: int) -> int:
        """Host bytes chunk ``c`` holds during the update (weights, masters, state)."""
        pack, chunk = self.pack, self.pack.chunks[c]
        n = chunk.w_bytes
        if pack.layout.mixed and chunk.params:
            n += chunk.m_bytes
        if pack.optimizes(c) and pack.state_laid_out(c):
            n += pack.k_sizes[c]
        return n

    def window_bytes(self) -> int:
        """The most host bytes the update holds at once: three consecutive chunks."""
        sizes = [self.chunk_bytes(c) for c in range(self.count)]
        return max((sum(sizes[max(0, j - WINDOW + 1):j + 1]) for j in range(len(sizes))),
                   default=0)

    def reserve(self) -> bool:
        """Make the update independent of the host tier's other users, so that it can run on
        the update worker: charge the host bytes it will hold (:meth:`window_bytes`, the
        chunks staged so far included) as a :class:`~swap.tier.Reservation` it allocates
        from. False (nothing charged) when that does not fit now, or when the update would
        create optimizer state (its first), whose size is only estimated."""
        pack = self.pack
        if any(pack.optimizes(c) and not pack.state_laid_out(c) for c in range(self.count)):
            return False
        held = [b for h in self.held.values() for b in h.buffers()]
        try:
            reservation = self.host.reserve(
                self.window_bytes() - sum(b.numel() for b in held),
                f"the update of pack {self.p} (three chunks)")
        except OutOfCapacity:
            return False
        for buf in held:
            reservation.adopt(buf)
        self.mem, self.on_worker = reservation, True
        return True

    def finish(self) -> None:
        """On the runtime's thread, after :meth:`run`: give back the reservation's unused
        bytes and settle the optimizer state's charge."""
        if isinstance(self.mem, Reservation):
            self.mem.close()
            self.mem = self.host
        self.pack.settle_optimizer_bytes()

    def _wait(self, handle: Handle, name: str) -> None:
        """Wait for I/O the step reads or whose buffer it reuses; on the runtime's thread
        that is a stall of compute, on the update worker part of the update's busy time."""
        if self.on_worker:
            handle.synchronize()
        else:
            self._engine.synchronize(handle, name)

    def run(self) -> None:
        """Step the optimizer over every chunk and write each back behind (after
        :meth:`prepare`; on the update worker after :meth:`reserve` too)."""
        pack = self.pack
        assert self.grads is not None, "prepare() first"
        grads, ready = self.grads
        if ready is not None:  # the host optimizer reads these gradients
            self._wait(ready, link(Loc.DEVICE, Loc.HOST))
        self.stage()  # (a deferred update: its first chunks are read now)
        n = self.count
        for c in range(n):
            if c + 1 < n and self.next == c + 1:
                self._retire(c + 1 - WINDOW)  # its buffers serve the read of chunk c + 1
                self._read()
            self._step(c, grads)
        # Written behind: the last chunks' buffers go back to the pool when their writes end;
        # with a sharded optimizer, a pack of one chunk keeps its weights for the broadcast.
        # (A failed write is the step's error, raised where the runtime waits for its
        # writes; here each buffer goes back once its write is over, whatever its result.)
        while self.held:
            held = self.held.pop(next(iter(self.held)))
            done = GroupHandle(held.writes)
            if self._keep is not None and len(pack.chunks) == 1:
                self._keep(held.w, done)
                bufs = [b for b in held.buffers() if b is not held.w]
            else:
                bufs = held.buffers()
            for buf in bufs:
                with contextlib.suppress(Exception):
                    self.mem.release(buf, after=done)

    def abandon(self) -> None:
        """After a failure: give every buffer back once its I/O is over, drop estimates, and
        unbind the masters and state (errors of that I/O are the step's, not raised here)."""
        for held in self.held.values():
            io = GroupHandle(held.reads + held.writes)
            for buf in held.buffers():
                with contextlib.suppress(Exception):
                    self.mem.release(buf, after=io)
            self.host.uncharge(held.estimate)
        self.held.clear()
        if isinstance(self.mem, Reservation):
            self.mem.close()
            self.mem = self.host
        self.pack.bind_masters(None)
        for c in range(len(self.pack.chunks)):
            if self.pack.k_layouts[c] is not None:
                self.pack.bind_state(c, None)

    # -- one chunk ----------------------------------------------------------------------------
    def _read(self) -> None:
        io, pack, c = self._io, self.pack, self.next
        chunk = pack.chunks[c]
        self.next += 1
        what = f"pack {self.p} (chunk {c})"
        w = self.mem.allocate(chunk.w_bytes, f"weights of {what}")
        # Held from here on, so that abandon() gives back what a failure below leaves (an
        # allocation may raise the error of an earlier failed write, which the tier reclaims).
        held = self.held[c] = _Held(chunk, w, None, None, 0, [])
        held.reads.append(io.read(pack.key("W", c), w, READ, "W"))
        if pack.layout.mixed and chunk.params:  # the fp32 masters are part of K
            held.m = self.mem.allocate(chunk.m_bytes, f"master weights of {what}")
            held.reads.append(io.read(pack.key("M", c), held.m, READ, "K"))
        if pack.optimizes(c) and pack.state_laid_out(c):
            held.k = self.mem.allocate(pack.k_sizes[c], f"optimizer state of {what}")
            held.reads.append(io.read(pack.key("K", c), held.k, READ, "K"))
        elif pack.optimizes(c):  # its first update creates the state: hold room for it
            estimate = pack.state_estimate(c)
            self.host.charge(estimate, f"optimizer state of {what}")
            held.estimate = estimate

    def _retire(self, c: int) -> None:
        """Wait for chunk ``c``'s writes and give its buffers back (no-op if gone)."""
        held = self.held.get(c)
        if held is None:
            return
        for handle in held.writes:  # (a failed write raises here: abandon() frees the chunk)
            self._wait(handle, WRITE)
        del self.held[c]
        for buf in held.buffers():
            self.mem.release(buf)

    def _step(self, c: int, grads: torch.Tensor) -> None:
        io, pack, held = self._io, self.pack, self.held[c]
        chunk = held.chunk
        for handle in held.reads:  # the optimizer reads these bytes on this thread
            self._wait(handle, READ)
        if c == self.count - 1 and self.new_buffers is not None:
            # buffers (after the trainable parameters) are in the last chunk's weights
            if self.buffers_ready is not None:  # (the host reads them)
                self._wait(self.buffers_ready, link(Loc.DEVICE, Loc.HOST))
            restore_buffers(self._weights.changing(self.p), self.new_buffers, held.w, chunk.w[0])
            self.new_buffers = self.buffers_ready = None
        if pack.optimizes(c):
            self._step_optimizer(c, held, grads)
        if pack.layout.mixed and chunk.params:
            pack.refresh_weights(held.w, chunk)
        if self._ties is not None:  # sharers' copies of tied weights in this chunk
            self._ties.after_update(self.p, held.w, chunk.w[0], chunk.params)
        held.writes.append(io.write(pack.key("W", c), held.w, WRITE, "W"))
        if held.m is not None:
            held.writes.append(io.write(pack.key("M", c), held.m, WRITE, "K"))
        if held.k is not None:
            held.writes.append(io.write(pack.key("K", c), held.k, WRITE, "K"))
        if chunk.params:
            pack.bind_masters(None, chunk)
        if pack.k_layouts[c] is not None:
            pack.bind_state(c, None)

    def _step_optimizer(self, c: int, held: _Held, grads: torch.Tensor) -> None:
        """``optimizer.step()`` with gradients on chunk ``c``'s parameters only (the others'
        are None, so the optimizer leaves them and their state alone)."""
        pack, chunk = self.pack, held.chunk
        pack.bind_masters(held.m if held.m is not None else held.w, chunk)
        if held.k is not None:
            pack.bind_state(c, held.k)
        for i in chunk.params:
            e = pack.layout.trainable[i]
            pack.masters[i].grad = e.gview(grads) if pack.got_grad[i] else None
        pack.optimizer.step()
        for i in chunk.params:
            pack.masters[i].grad = None
        if not pack.state_laid_out(c):  # the step created state: give it a flat layout
            old = held.k
            pack.layout_state(c)
            self.host.uncharge(held.estimate)
            held.estimate = 0
            new = None
            if pack.k_layouts[c] is not None:
                new = self.host.allocate(pack.k_sizes[c], f"optimizer state of pack "
                                         f"{self.p} (chunk {c})")
                pack.bind_state(c, new, copy_in=True)
            held.k = new
            if old is not None:  # (the state of before, now copied into the new layout)
                self.mem.release(old)

