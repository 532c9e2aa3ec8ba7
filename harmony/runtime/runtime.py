"""The runtime: interprets a lowered schedule, one task at a time.

The schedule says what happens when; the runtime only does it. Data moves go through the swap
engine and return handles; a compute task first waits for the handles of what it reads. Every
value's copies are kept in one :class:`Slot`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from harmony.model.buffers import buffer_values, buffers_unchanged, copy_buffers, load_buffers
from harmony.model.chain import as_tuple, call, checked_loss
from harmony.model.layout import Entry
from harmony.model.precision import Precision
from harmony.runtime.chunked_update import ChunkedUpdate, broadcast_chunks
from harmony.runtime.pack import Pack

if TYPE_CHECKING:
    from harmony.parallel.data_parallel import DataParallel
from harmony.model.rng import layer_rng
from harmony.model.tied import TiedWeights
from harmony.runtime.timeline import Clock, clock_for
from harmony.runtime.update_worker import UpdateWorker
from harmony.runtime.updates import NonFiniteLoss as NonFiniteLoss  # (raised by an update)
from harmony.runtime.updates import update
from schedules.effects import updates_after_backward
from schedules.schedule import Schedule
from schedules.simulate import Sizes, link
from schedules.task import Kind, Loc, Op, Ref, Task
from swap.engine import SwapEngine
from swap.handle import GroupHandle, Handle
from swap.nvme import NvmeStore
from swap.staging import read_staged, write_staged
from swap.tier import Tier

Value = tuple[torch.Tensor | None, ...]


@dataclass
class Slot:
    """The copies of one value: on the device and at its home, with the copies filling them.

    ``dev_bufs``/``home_bufs`` are pool buffers backing the copies (released to their tier);
    ``dev_charged`` counts device bytes of tensors compute produced (uncharged when freed).
    ``home_users``: the handles of every copy that wrote or read ``home_bufs`` (its swap-out
    and each swap-in): the home buffers go back to their pool only once all are done, since a
    swap-in that compute merely waited for may still be reading them on a GPU.
    """

    dev: Value | None = None
    dev_bufs: list[torch.Tensor] = field(default_factory=list)
    dev_charged: int = 0
    dev_ready: Handle | None = None
    home: Value | None = None
    home_bufs: list[torch.Tensor] = field(default_factory=list)
    home_ready: Handle | None = None
    home_users: list[Handle] = field(default_factory=list)
    single: bool = True
    home_keys: list[str] = field(default_factory=list)  # files of a value homed on NVMe
    outputs: Value | None = None  # S values: the forward's outputs, whose graph backward walks


def _nbytes(value: Value) -> int:
    return sum(t.numel() * t.element_size() for t in value if t is not None)


def _all(handles: list[Handle]) -> Handle | None:
    """One handle done when all of ``handles`` are (None for none)."""
    return GroupHandle(list(handles)) if handles else None


@dataclass
class StepData:
    """One step's micro-batches: inputs and targets (on the host), and each one's loss weight."""

    inputs: list[tuple[torch.Tensor, ...]]
    targets: list[torch.Tensor]
    weights: list[float]
    single_input: bool


class Runtime:
    """Runs lowered schedules over a fixed set of packs.

    Args:
        packs: the packs, in chain order. tiers: the tier of each location.
        engine: the swap engine. loss_fn: ``(output, target) -> mean loss``.
        device: the compute device. seed: the seed randomness derives from.
    """

    def __init__(self, packs: list[Pack], tiers: dict[Loc, Tier], engine: SwapEngine,
                 loss_fn: Callable[..., torch.Tensor], device: torch.device, seed: int,
                 store: NvmeStore | None = None) -> None:
        self.packs, self.tiers, self.engine, self.store = packs, tiers, engine, store
        # pack -> the update of an NVMe-homed pack, its first chunks being read
        self.staged: dict[int, ChunkedUpdate] = {}
        self.writes: list[tuple[Handle, str]] = []  # NVMe writes behind this step
        # (max norm, (pack, trainable index) in the model's parameter order) when clipping
        self.clip: tuple[float, list[tuple[int, int]]] | None = None
        self.grad_norm = 0.0  # the global norm the last clipping saw
        # parameters used by several packs (harmony/model/tied.py)
        self.ties: TiedWeights | None = None
        self.loss_fn, self.device, self.seed = loss_fn, device, seed
        # Mixed precision (the trainer's Precision, whose loss scale it updates after each
        # step): compute runs under its autocast; fp16 scales the loss and unscales and checks
        # every gradient before the first update.
        self.precision = Precision()
        self.values: dict[Ref, Slot] = {}
        self.w_dev: dict[int, torch.Tensor] = {}
        self.w_ready: dict[int, Handle] = {}
        # NVMe packs: buffers this step's forward changed, until the update writes them
        self.new_buffers: dict[int, list[torch.Tensor]] = {}
        # pack -> the copy of its changed buffers to the home copy (or to new_buffers), until
        # the step ends: waited for before its forward changes them again, its next load
        # reads the home copy, or the host reads them
        self.buffer_copies: dict[int, Handle] = {}
        # ids of the buffers a forward changes (the profile finds them); None: every buffer
        self.changing: set[int] | None = None
        # When a list, every task appends what it did: its text, start and end (seconds since
        # the step began) and the bytes each tier held after it (Trainer.record_step).
        self.record: list[dict[str, object]] | None = None
        self.clock: Clock = clock_for(device)  # (times the tasks of a recorded step)
        # Data parallelism (harmony.parallel.data_parallel): the rank's all-reduces, and the global
        # index of its first micro-batch (randomness follows global micro-batch indices).
        self.dp: DataParallel | None = None
        self.mb_offset = 0
        # Sharded optimizer: the rank owning each pack's optimizer (None: every rank updates
        # every pack). A rank steps only its packs and receives the others' weights.
        self.owners: tuple[int, ...] | None = None
        # pack -> an NVMe pack's updated host weights and their write, until broadcast
        self.sending: dict[int, tuple[torch.Tensor, Handle]] = {}
        # Pipeline ranks (harmony.parallel.pipeline): ``comm`` runs SEND/RECV tasks; ``input_grad``:
        # pack 0's input arrived from another rank, so its backward produces D0 to send back.
        self.comm: Callable[[Runtime, Task], None] | None = None
        self.input_grad = False
        # overlap_updates: host-homed packs' optimizer steps run here, behind the next pack's
        # backward (harmony.runtime.update_worker); their gradients are deleted when joined
        self.worker: UpdateWorker | None = None
        self.deferred_g: set[int] = set()
        # Copies to a GPU read pinned memory only: the step's inputs and targets are first
        # copied into (pinned) host-tier buffers (see _stage_batch).
        self.stage_batch = tiers[Loc.HOST].pin
        tiers[Loc.HOST].when_full = self._host_full
        # checking mode (HARMONY_COPIER=deferred): the tiers check their buffers' lifetimes
        engine.watch(tiers.values(), device=tiers[Loc.DEVICE])

    def close(self) -> None:
        """Stop the update worker, if any."""
        if self.worker is not None:
            self.worker.close()

    @property
    def dev(self) -> Tier:
        return self.tiers[Loc.DEVICE]

    # -- the step ---------------------------------------------------------------------------
    def run(self, schedule: Schedule, sizes: Sizes, data: StepData, step: int,
            seconds: dict[str, float]) -> float:
        """Run one step; returns the batch's mean loss."""
        assert schedule.placement is not None
        self.schedule, self.sizes, self.data, self.step = schedule, sizes, data, step
        self.placement = schedule.placement
        # The batch loss stays on the device until a check needs it (once per step, before
        # the first update): reading it per micro-batch would block the host each time.
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grads: set[int] = set()
        self.forwarded: set[tuple[int, int]] = set()  # (pack, micro-batch) forwards run
        self.updated: list[int] = []  # packs whose update ran in this step
        self.stage_early = updates_after_backward(schedule.tasks)
        if self.ties is not None:  # refuses a schedule updating an owner too early
            self.ties.start(schedule)
        for m, x in enumerate(data.inputs):
            self.values[Ref(Kind.X, 0, m)] = Slot(home=x, single=data.single_input)
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        phase = {Op.FWD: "forward", Op.BWD: "backward", Op.UPD: "update", Op.SEND: "comm",
                 Op.RECV: "comm"}
        # record_step: each task's start and end, from marks on the device's clock (events on
        # CUDA) read after the step's device synchronization; the tiers' bytes after it
        clock = self.clock if self.record is not None else None
        marks: list[tuple[Task, Any, Any, dict[str, int]]] = []
        begin = clock.mark() if clock is not None else None
        try:
            if self.stage_batch:  # (a failure here gives back what was staged: abandon)
                self._stage_batch(data)
            for task in schedule.tasks:
                m0 = clock.mark() if clock is not None else None
                t0 = time.perf_counter()
                self._dispatch(task)
                t1 = time.perf_counter()
                name = phase.get(task.op, "swap")
                seconds[name] = seconds.get(name, 0.0) + t1 - t0
                if clock is not None:
                    marks.append((task, m0, clock.mark(),
                                  {loc.value: tier.used for loc, tier in self.tiers.items()}))
            if self.worker is not None:  # the last overlapped step, before anyone reads
                self.worker.join()
            # A step succeeds only once what it wrote behind is on disk: a failed write
            # surfaces here, not silently in a later step.
            for handle, name in self.writes:
                self.engine.synchronize(handle, name)
            self.writes.clear()
            # ... and once the device ran all of it: an error of a copy or a kernel surfaces
            # in this step (on CUDA, one device synchronization per step).
            self.engine.synchronize_all()
            self.buffer_copies.clear()
            if clock is not None and self.record is not None:
                self.record.extend({"task": str(task), "start": clock.seconds(begin, m0),
                                    "end": clock.seconds(begin, m1), "bytes": held}
                                   for task, m0, m1, held in marks)
        except BaseException:
            if self.dp is not None:
                self.dp.abandon()
            self.abandon()  # (first waits for the update worker, which may still write)
            self.writes.clear()
            raise
        return float(self.loss)

    def _stage_batch(self, data: StepData) -> None:
        """Copy the step's inputs and targets into host-tier buffers (pinned on CUDA), from
        which the asynchronous copies to the device read them: such a copy must not read
        pageable memory, which the caller may change or Python free while it runs. The
        buffers go back to the pool once the copies reading them are done."""
        host = self.tiers[Loc.HOST]

        def staged(t: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
            buf = host.allocate(t.numel() * t.element_size(), what)
            view = buf.view(t.dtype).view(t.shape)
            self.engine.host_write(view, what)
            view.copy_(t)
            return view, buf

        for m, x in enumerate(data.inputs):
            slot = self.values[Ref(Kind.X, 0, m)]
            home: list[torch.Tensor | None] = []
            for i, t in enumerate(x):
                if t.device.type != "cpu":  # (already on the device)
                    home.append(t)
                    continue
                view, buf = staged(t, f"input {i} of micro-batch {m}")
                home.append(view)
                slot.home_bufs.append(buf)
            slot.home = tuple(home)
        for m, y in enumerate(data.targets):
            if y.device.type == "cpu":
                self.targets[m] = staged(y, f"targets of micro-batch {m}")

    def _target(self, m: int) -> torch.Tensor:
        """Micro-batch ``m``'s targets on the device (from their staged host buffer, if any,
        which goes back to the pool once the copy is done)."""
        staged = self.targets.pop(m, None)
        if staged is None:  # (on the device already, or the device is the CPU)
            return self.data.targets[m].to(self.device)
        view, buf = staged
        target = torch.empty_like(view, device=self.device)
        name = link(Loc.HOST, Loc.DEVICE)
        handle = self.engine.copy(target, view, name, "T")
        self.engine.wait(handle, name)
        self.tiers[Loc.HOST].release(buf, after=handle)
        return target

    def abandon(self) -> None:
        """Drop every transient value after a failed step (weights stay at home).

        Cleanup errors (say, more failed writes after a full disk) must not hide the error
        that ended the step, so each is suppressed here."""
        if self.worker is not None:  # (its step may still read the gradients)
            self.worker.abandon()
        self.deferred_g.clear()
        for ref in list(self.values):
            with contextlib.suppress(Exception):
                self._drop(ref, home_too=True)
            self.values.pop(ref, None)
        for p in list(self.w_dev):
            self._free_w(p)
        for staged in self.staged.values():
            staged.abandon()
        self.staged.clear()
        for w, hw in list(self.sending.values()):
            with contextlib.suppress(Exception):
                self.tiers[Loc.HOST].release(w, after=hw)
        self.sending.clear()
        for _, buf in getattr(self, "targets", {}).values():  # (staged, never copied)
            self.tiers[Loc.HOST].release(buf)
        self.targets = {}
        self.new_buffers.clear()
        self.buffer_copies.clear()
        if self.ties is not None:
            self.ties.abandon(self)
        for pack in self.packs:
            pack.grad_sink = None
            pack.got_grad = [False] * len(pack.got_grad)
            for e in pack.layout.trainable:
                e.tensor.grad = None
            for master in pack.masters:
                master.grad = None

    def _dispatch(self, task: Task) -> None:
        op = task.op
        if op is Op.FWD:
            self._forward(task)
        elif op is Op.BWD:
            self._backward(task)
        elif op is Op.UPD:
            update(self, task)
        elif op is Op.ALLREDUCE:  # data parallelism: sum G over the ranks, asynchronously
            assert self.dp is not None, f"{task} needs parallel='data'"
            slot = self.values[task.ref]
            assert slot.dev is not None and slot.dev[0] is not None
            self.dp.start(task.pack, slot.dev[0], self.packs[task.pack].layout.trainable,
                            self.engine.stats)
        elif op is Op.REDUCE:  # sharded optimizer: sum G onto the pack's owner
            assert self.dp is not None and self.owners is not None, f"{task} needs sharding"
            slot = self.values[task.ref]
            assert slot.dev is not None and slot.dev[0] is not None
            self.dp.start_reduce(task.pack, self.owners[task.pack], slot.dev[0],
                                 self.packs[task.pack].layout.trainable, self.engine.stats)
        elif op is Op.BROADCAST:  # sharded optimizer: the owner's new W to every rank
            self._broadcast_w(task.pack)
        elif op.is_comm:  # a pipeline rank's SEND/RECV (harmony.parallel.pipeline)
            assert self.comm is not None, f"{task}: this runtime is not a pipeline rank"
            self.comm(self, task)
        elif task.kind is Kind.W:
            if op is Op.SWAP_IN:
                self._load_w(task.pack)
            elif op is Op.FREE:
                self._free_w(task.pack)
            else:
                raise ValueError(f"{task}: weights on the device are never written back")
        elif op is Op.SWAP_IN:
            self._swap_in(task.ref)
        elif op is Op.SWAP_OUT:
            self._swap_out(task.ref)
        elif op is Op.FREE:
            self._drop(task.ref, home_too=False)
        elif op is Op.DEL:
            self._drop(task.ref, home_too=True)

    # -- weights ----------------------------------------------------------------------------
    def owns(self, p: int) -> bool:
        """Whether this rank updates pack ``p`` (always, unless the optimizer is sharded)."""
        return self.owners is None or self.dp is None or \
            self.owners[p] == self.dp.group.rank

    def _broadcast_w(self, p: int) -> None:
        """Start sending pack ``p``'s updated home weights from its owner into every other
        rank's home copy; the next use of the pack's weights waits for it (:meth:`_w_arrived`;
        the trainer waits for all before it reads or writes weights between steps)."""
        assert self.dp is not None and self.owners is not None
        self._join_update(p)
        self._settle_buffers(p)  # (the collective reads or writes the whole home copy)
        pack = self.packs[p]
        engine = self.engine
        if pack.home_w is not None:
            def sent(read: Handle | None) -> None:
                # (the next update writes the home copy: the host must know that the copy
                # to a device buffer that the broadcast sent from has ended)
                if read is not None:
                    engine.synchronize(read, link(Loc.HOST, Loc.DEVICE))

            self.dp.start_broadcast(p, self.owners[p], pack.home_w, engine, sent)
            return
        # Weights on NVMe: the owner sends the host copy its update wrote; the others receive
        # into host memory and write their file. Waited for here, so that the host copies
        # go back to the pool at once (as the simulator assumes). A pack of several chunks
        # goes chunk by chunk (its update kept none of them).
        if len(pack.chunks) > 1:
            return broadcast_chunks(self, p)
        host = self.tiers[Loc.HOST]
        if self.owns(p):
            w, written = self.sending.pop(p)
            # (back to the pool once written to its file and read by the copy to the device)
            self.dp.start_broadcast(p, self.owners[p], w, engine, lambda read: host.release(
                w, after=_all([h for h in (written, read) if h is not None])))
        else:
            buf = host.allocate(pack.layout.w_bytes, f"weights of pack {p}")

            def write(_: Handle | None) -> None:
                handle = self._nvme_write(pack.key("W", 0), buf, link(Loc.HOST, Loc.NVME), "W")
                host.release(buf, after=handle)

            self.dp.start_broadcast(p, self.owners[p], buf, engine, write)
        self.dp.finish_broadcast(p)

    def _w_arrived(self, p: int) -> None:
        """Sharded optimizer: wait until pack ``p``'s weights of the last update are in the
        home copy (the broadcast of another rank's update, or this rank's own send before
        its update overwrites them). A no-op otherwise."""
        if self.dp is not None and p in self.dp.broadcasts:
            self.dp.finish_broadcast(p)

    def _join_update(self, p: int | None = None) -> None:
        """Wait for the overlapped optimizer step in flight (of pack ``p`` only, if given)."""
        if self.worker is not None and (p is None or self.worker.pending == p):
            self.worker.join()

    def _load_w(self, p: int) -> None:
        self._w_arrived(p)
        self._join_update(p)
        pack = self.packs[p]
        n = pack.layout.w_bytes
        buf = self.dev.allocate(n, f"weights of pack {p}")
        name = link(pack.home, Loc.DEVICE)
        # The compute that reads these weights waits for this copy (see _wait_w).
        if pack.home_w is not None:
            self._wait_buffers(p)  # (the home copy's buffers as the last forward left them)
            self.w_ready[p] = self.engine.copy(buf, pack.home_w, name, "W")
        else:  # each chunk's file into its slice
            self.w_ready[p] = GroupHandle([
                self._nvme_read(pack.key("W", c.index), buf[c.w[0]:c.w[1]], name, "W")
                for c in pack.chunks])
        self.w_dev[p] = buf
        pack.layout.bind(buf)

    def _free_w(self, p: int) -> None:
        pack = self.packs[p]
        pack.layout.bind(None)
        buf = self.w_dev.pop(p)
        # (the copy of the buffers a forward changed may still read it)
        self.dev.release(buf, after=_all([h for h in (self.w_ready.pop(p, None),
                                                      self.buffer_copies.get(p)) if h]))

    def _settle_buffers(self, p: int) -> None:
        """Make the host know the copy of pack ``p``'s changed buffers has ended, if any."""
        copies = self.buffer_copies.pop(p, None)
        if copies is not None:
            self.engine.synchronize(copies, link(Loc.DEVICE, Loc.HOST))

    def _wait_buffers(self, p: int) -> None:
        """Order what comes next after the copy of pack ``p``'s changed buffers, if any."""
        copies = self.buffer_copies.get(p)
        if copies is not None:
            self.engine.wait(copies, link(Loc.DEVICE, Loc.HOST))

    # -- NVMe -------------------------------------------------------------------------------
    def _nvme_read(self, key: str, dst: torch.Tensor, name: str, kind: str) -> Handle:
        """Start reading a file into ``dst``; a GPU ``dst`` goes through host staging, the
        copy to the device starting when the read ends (:mod:`swap.staging`): nothing here
        blocks the host thread."""
        assert self.store is not None
        if dst.device.type == "cpu":
            self.engine.count(name, kind, dst.numel() * dst.element_size())
            self.engine.host_write(dst, f"the file {key} read into it")
            return self.store.read(key, dst)
        return read_staged(self.store, self.engine, self.tiers[Loc.HOST], key, dst, kind)

    def _nvme_write(self, key: str, src: torch.Tensor, name: str, kind: str) -> Handle:
        """Start writing ``src`` to a file (a GPU ``src`` through host staging, unblocked)."""
        assert self.store is not None
        if src.device.type == "cpu":
            self.engine.count(name, kind, src.numel() * src.element_size())
            self.engine.host_read(src, f"the file {key} written from it")
            handle = self.store.write(key, src.contiguous())
        else:
            handle = write_staged(self.store, self.engine, self.tiers[Loc.HOST], key, src, kind)
        self.writes.append((handle, name))
        return handle

    def _wait_w(self, p: int) -> None:
        self._w_arrived(p)  # (weights homed on the device are read in place)
        self._wait_buffers(p)  # (a forward changes them: not before the last copy read them)
        handle = self.w_ready.pop(p, None)
        if handle is not None:
            self.engine.wait(handle, link(self.packs[p].home, Loc.DEVICE))
            if p in self.new_buffers:  # the file has the buffers of before this step's forward
                name = link(Loc.HOST, Loc.DEVICE)
                self.engine.wait(load_buffers(self._changing(p), self.new_buffers[p],
                                              self.w_dev[p], self.engine, name), name)

    def _changing(self, p: int) -> list[Entry]:
        """Pack ``p``'s buffers that a forward changes (all of them if nobody said)."""
        buffers = self.packs[p].layout.buffers
        if self.changing is None:
            return buffers
        return [e for e in buffers if id(e.tensor) in self.changing]

    def _keep_buffers(self, p: int) -> None:
        """Make the buffer updates of a forward count: carry them from the device copy of the
        weights to the home copy (an NVMe pack keeps them in host memory until its update
        writes its weights)."""
        pack = self.packs[p]
        buffers = self._changing(p)
        if not buffers or pack.home is Loc.DEVICE:  # (bound to the home copy)
            return
        # (an earlier copy of this step is on the same link: the new one's end implies it)
        name = link(Loc.DEVICE, Loc.HOST)
        if pack.home_w is not None:
            self.buffer_copies[p] = copy_buffers(buffers, self.w_dev[p], pack.home_w,
                                                 self.engine, name)
        else:
            self.new_buffers[p], self.buffer_copies[p] = buffer_values(
                buffers, self.w_dev[p], self.engine, name, pin=self.tiers[Loc.HOST].pin)

    # -- activations and gradients ----------------------------------------------------------
    def _home(self, ref: Ref) -> Loc:
        return self.placement.home(ref.kind, ref.pack)

    def _swap_in(self, ref: Ref) -> None:
        if ref.kind is Kind.G:
            return self._load_grad(ref.pack)
        slot = self.values[ref]
        assert slot.home is not None and slot.dev is None, ref
        if slot.home_ready is not None:  # written behind earlier: the host must see the bytes
            self.engine.synchronize(slot.home_ready, link(Loc.DEVICE, self._home(ref)))
            slot.home_ready = None
        dev: list[torch.Tensor | None] = []
        handles: list[Handle] = []
        name = link(self._home(ref), Loc.DEVICE)
        for i, t in enumerate(slot.home):
            if t is None:
                dev.append(None)
                continue
            buf = self.dev.allocate(t.numel() * t.element_size(), f"{ref}")
            view = buf.view(t.dtype).view(t.shape)
            if slot.home_keys:
                handles.append(self._nvme_read(slot.home_keys[i], view, name, ref.kind.value))
            else:
                handles.append(self.engine.copy(view, t, name, ref.kind.value))
                slot.home_users.append(handles[-1])  # (reads the home buffer)
            slot.dev_bufs.append(buf)
            dev.append(view)
        slot.dev, slot.dev_ready = tuple(dev), GroupHandle(handles)

    def _swap_out(self, ref: Ref) -> None:
        if ref.kind is Kind.G:
            return self._store_grad(ref.pack)
        slot = self.values[ref]
        assert slot.dev is not None, ref
        home_loc = self._home(ref)
        home_tier = self.tiers[home_loc]
        name = link(Loc.DEVICE, home_loc)
        self._wait_dev(slot, ref)
        home: list[torch.Tensor | None] = []
        handles: list[Handle] = []
        for i, t in enumerate(slot.dev):
            if t is None:
                home.append(None)
                continue
            if home_loc is Loc.NVME:
                key = f"{ref}.{i}"
                handles.append(self._nvme_write(key, t.detach(), name, ref.kind.value))
                home_tier.charge(t.numel() * t.element_size(), f"{ref} on NVMe")
                slot.home_keys.append(key)
                home.append(torch.empty(t.shape, dtype=t.dtype, device="meta"))
                continue
            buf = home_tier.allocate(t.numel() * t.element_size(), f"{ref} at {home_loc.value}")
            view = buf.view(t.dtype).view(t.shape)
            handles.append(self.engine.copy(view, t.detach(), name, ref.kind.value))
            slot.home_bufs.append(buf)
            home.append(view)
        slot.home = tuple(home)
        slot.home_ready = GroupHandle(handles)
        slot.home_users.append(slot.home_ready)
        self._release_dev(slot, after=slot.home_ready)

    def _release_dev(self, slot: Slot, after: Handle | None) -> None:
        """Give the value's device buffers back once ``after`` (a copy reading them) and the
        copy filling them, if nothing waited for it (a value loaded and never read), are done."""
        if slot.dev_ready is not None:
            after = _all([h for h in (after, slot.dev_ready) if h is not None])
        for buf in slot.dev_bufs:
            self.dev.release(buf, after=after)
        if slot.dev_charged:
            self.dev.uncharge(slot.dev_charged, after=after)
        slot.dev, slot.dev_bufs, slot.dev_charged, slot.dev_ready = None, [], 0, None
        slot.outputs = None

    def _drop(self, ref: Ref, home_too: bool) -> None:
        if ref.kind is Kind.G:
            if home_too:
                return self._delete_grad(ref.pack)
            raise ValueError(f"~{ref}: gradients are never dropped, only stored or deleted")
        slot = self.values.get(ref)
        if slot is None:
            return
        self._release_dev(slot, after=None)
        if home_too:
            home_tier = self.tiers[self._home(ref)]
            for buf in slot.home_bufs:
                home_tier.release(buf, after=_all(slot.home_users))
            if slot.home_keys and self.store is not None:
                for key, t in zip(slot.home_keys, [t for t in slot.home or () if t is not None]):
                    if key in self.store:  # (a failed write left no file)
                        self.store.delete(key)  # the file goes once its write is done
                    home_tier.uncharge(t.numel() * t.element_size())
            del self.values[ref]

    def _wait_dev(self, slot: Slot, ref: Ref) -> None:
        if slot.dev_ready is not None:
            self.engine.wait(slot.dev_ready, link(self._home(ref), Loc.DEVICE))
            slot.dev_ready = None

    def _read(self, ref: Ref) -> Value:
        slot = self.values[ref]
        if slot.dev is None:
            raise AssertionError(f"{ref} is not on the device")
        self._wait_dev(slot, ref)
        return slot.dev

    def _produce(self, ref: Ref, value: Value, single: bool) -> None:
        # A layer may pass an input through (a mask in a tuple), and autograd may hand back a
        # gradient it was given: such tensors live in buffers other values own, which go back
        # to the pool when those values are freed. The new value gets its own copy.
        owned = {b.untyped_storage().data_ptr() for s in self.values.values() for b in s.dev_bufs}
        owned |= {b.untyped_storage().data_ptr() for b in self.w_dev.values()}
        value = tuple(t.clone() if t is not None and t.untyped_storage().data_ptr() in owned
                      else t for t in value)
        nbytes = _nbytes(value)
        self.dev.charge(nbytes, f"{ref}")
        self.values[ref] = Slot(dev=value, dev_charged=nbytes, single=single)

    # -- gradients --------------------------------------------------------------------------
    def _grad_slot(self, p: int) -> Slot:
        return self.values.setdefault(Ref(Kind.G, p), Slot())

    def _bind_grads(self, p: int, flat: torch.Tensor | None) -> None:
        if self.packs[p].layout.mixed:  # gradients are added into flat in fp32 (Pack._mark)
            self.packs[p].grad_sink = flat
            return
        for e in self.packs[p].layout.trainable:
            e.tensor.grad = None if flat is None else e.view(flat)

    def _new_grad(self, p: int) -> None:
        pack = self.packs[p]
        buf = self.dev.allocate(pack.layout.g_bytes, f"gradients of pack {p}")
        buf.zero_()  # backward accumulates in place into these views (see Pack.got_grad)
        slot = self._grad_slot(p)
        slot.dev, slot.dev_bufs = (buf,), [buf]
        self._bind_grads(p, buf)

    def _load_grad(self, p: int) -> None:
        slot = self._grad_slot(p)
        assert slot.home is not None and slot.home[0] is not None
        if slot.home_ready is not None:
            self.engine.synchronize(slot.home_ready, link(Loc.DEVICE, self.placement.update_loc(p)))
            slot.home_ready = None
        buf = self.dev.allocate(self.packs[p].layout.g_bytes, f"gradients of pack {p}")
        name = link(self.placement.update_loc(p), Loc.DEVICE)
        slot.dev_ready = self.engine.copy(buf, slot.home[0], name, "G")
        slot.home_users.append(slot.dev_ready)  # (reads the home buffer)
        slot.dev, slot.dev_bufs = (buf,), [buf]
        self._bind_grads(p, buf)

    def _store_grad(self, p: int) -> None:
        slot = self._grad_slot(p)
        self._wait_allreduce(p)  # the copy reads the summed gradients
        assert slot.dev is not None and slot.dev[0] is not None
        loc = self.placement.update_loc(p)
        if not slot.home_bufs:
            slot.home_bufs = [self.tiers[loc].allocate(self.packs[p].layout.g_bytes,
                                                       f"gradients of pack {p} at {loc.value}")]
            slot.home = (slot.home_bufs[0],)
        assert slot.home is not None and slot.home[0] is not None
        slot.home_ready = self.engine.copy(slot.home[0], slot.dev[0], link(Loc.DEVICE, loc), "G")
        slot.home_users.append(slot.home_ready)
        self._bind_grads(p, None)
        self._release_dev(slot, after=slot.home_ready)

    def _delete_grad(self, p: int) -> None:
        if self.worker is not None and self.worker.pending == p:
            self.deferred_g.add(p)  # its overlapped step reads them: deleted when joined
            return
        slot = self.values.pop(Ref(Kind.G, p), None)
        if slot is None:
            return
        self._bind_grads(p, None)
        self._release_dev(slot, after=None)
        tier = self.tiers[self.placement.update_loc(p)]
        for buf in slot.home_bufs:
            tier.release(buf, after=_all(slot.home_users))
        pack = self.packs[p]
        pack.got_grad = [False] * len(pack.got_grad)

    # -- compute ----------------------------------------------------------------------------
    def _run_layers(self, p: int, m: int, value: tuple[torch.Tensor, ...],
                    single: bool) -> tuple[object, bool]:
        pack = self.packs[p]
        out: object = value[0] if single else value
        for j, layer in enumerate(pack.layers):
            idx = pack.first_layer + j
            with layer_rng(self.seed, self.step, m + self.mb_offset, idx, self.device), \
                    self.precision.autocast(self.device):
                out = call(layer, value)
            value = as_tuple(out, f"layer {idx} ({type(layer).__name__})")
        return out, not isinstance(out, tuple)

    def _work(self, p: int, m: int) -> int:
        return self.sizes.work[p][m]

    def _forward(self, task: Task) -> None:
        if task.last is not None:
            return self._forward_group(task)
        p, m = task.pack, task.mb
        assert m is not None
        self._wait_w(p)
        slot = self.values[Ref(Kind.X, p, m)]
        value = self._read(Ref(Kind.X, p, m))
        work = self._work(p, m)
        self.dev.charge(work, f"working memory of F{p}.{m}")
        try:
            if self.schedule.recompute:
                with torch.no_grad():
                    out, single = self._run_layers(p, m, value, slot.single)  # type: ignore[arg-type]
            else:
                leaf = self._leaf(p, value)
                if p == 0:  # the graph outlives X0.m's device buffer, which goes back to the pool
                    leaf = tuple(t.clone() for t in leaf)
                with torch.enable_grad():
                    out, single = self._run_layers(p, m, leaf, slot.single)
                s = self.sizes.s[p][m]
                self.dev.charge(s, f"autograd graph of F{p}.{m}")
                self.values[Ref(Kind.S, p, m)] = Slot(
                    dev=leaf, dev_charged=s, outputs=as_tuple(out, f"pack {p}"))
        finally:
            self.dev.uncharge(work)
        self.forwarded.add((p, m))
        self._keep_buffers(p)
        self._produce(Ref(Kind.X, p + 1, m), as_tuple(out, f"pack {p}"), single)

    def _forward_group(self, task: Task) -> None:
        """One forward over several micro-batches (``F p.m-l``): their inputs concatenated,
        each layer of the pack run once over all their samples, and the output split into
        the next pack's input per micro-batch. The planner groups only packs whose layers
        draw no random numbers, change no buffers and treat samples independently
        (:mod:`harmony.planning.groups`), so this equals a forward per micro-batch up to rounding;
        each micro-batch's backward then recomputes from its own stashed input as usual."""
        p, mbs = task.pack, task.mbs
        self._wait_w(p)
        refs = [Ref(Kind.X, p, m) for m in mbs]
        values = [tuple(t for t in self._read(r) if t is not None) for r in refs]
        counts = [v[0].shape[0] for v in values]
        # The group's working memory (its layers' at all its samples, and the concatenated
        # input) stays charged until every micro-batch's output has its own storage.
        work = self.sizes.forward_work(p, mbs)
        self.dev.charge(work, f"working memory of {task}")
        try:
            with torch.no_grad():
                # (the concatenated input is only _run_layers' to hold: freed after a layer)
                out, single = self._run_layers(p, mbs[0], tuple(
                    torch.cat(parts) for parts in zip(*values)), self.values[refs[0]].single)
                parts = [t.split(counts) for t in as_tuple(out, f"pack {p}")]
                del out
                for i, m in enumerate(mbs):
                    # A copy per micro-batch: each slot is freed on its own, and a view would
                    # keep the whole group's output alive.
                    self._produce(Ref(Kind.X, p + 1, m), tuple(t[i].clone() for t in parts),
                                  single)
        finally:
            self.dev.uncharge(work)
        self.forwarded.update((p, m) for m in mbs)
        self._keep_buffers(p)

    def _leaf(self, p: int, value: Value) -> tuple[torch.Tensor, ...]:
        if p == 0 and not self.input_grad:
            return tuple(t for t in value if t is not None)
        return tuple(t.detach().requires_grad_(t.is_floating_point())  # type: ignore[union-attr]
                     for t in value)

    def _backward(self, task: Task) -> None:
        p, m = task.pack, task.mb
        assert m is not None
        last = p == self.schedule.packs - 1
        self._wait_w(p)
        if p not in self.grads:
            if self.packs[p].home is Loc.NVME and p in self.stage_early and self.owns(p):
                self._stage(p)
            self._new_grad(p)
        else:
            self._read(Ref(Kind.G, p))
        x_ref = Ref(Kind.X, p, m)
        work = self._work(p, m)
        self.dev.charge(work, f"working memory of B{p}.{m}")
        # A recompute must not update the buffers a second time; they are restored only after
        # this micro-batch's backward, which may have saved them (see harmony.model.buffers).
        rerun = Ref(Kind.S, p, m) not in self.values and (p, m) in self.forwarded
        frozen = contextlib.ExitStack()
        if rerun:
            frozen.enter_context(buffers_unchanged(self._changing(p)))
        try:
            s_slot = self.values.get(Ref(Kind.S, p, m))
            if s_slot is not None:
                leaf = s_slot.dev
                assert s_slot.outputs is not None
                outs = s_slot.outputs
            else:
                value = self._read(x_ref)
                leaf = self._leaf(p, value)
                with torch.enable_grad():
                    out, _ = self._run_layers(p, m, leaf, self.values[x_ref].single)
                if not rerun:  # this was the micro-batch's only forward
                    self._keep_buffers(p)
                if last:
                    target = self._target(m)
                    with self.precision.autocast(self.device):
                        loss = checked_loss(self.loss_fn, out, target)
                    weighted = loss * self.data.weights[m]
                    if self.precision.scaling:  # fp16: unscaled before the first update
                        (weighted * self.precision.scale).backward()
                    else:
                        weighted.backward()
                    self.loss += weighted.detach().double()
                else:
                    outs = as_tuple(out, f"pack {p}")
            if not last:
                grads = self._read(Ref(Kind.D, p + 1, m))
                pairs = [(o, g) for o, g in zip(outs, grads)
                         if g is not None and o is not None and o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if p > 0 or self.input_grad:
                assert leaf is not None
                d = tuple(t.grad if t is not None else None for t in leaf)
                self._produce(Ref(Kind.D, p, m), d, False)
        finally:
            self.dev.uncharge(work)
            frozen.close()
        self.grads.add(p)

    def _grad_views(self, p: int) -> list[torch.Tensor | None]:
        """Pack ``p``'s gradients where its update will read them (None: no gradient)."""
        pack = self.packs[p]
        slot = self.values[Ref(Kind.G, p)]
        self._wait_allreduce(p)
        if self.placement.update_loc(p) is Loc.DEVICE:
            flat = slot.dev[0] if slot.dev is not None else None
            self._wait_dev(slot, Ref(Kind.G, p))
        else:
            if slot.home_ready is not None:
                self.engine.synchronize(slot.home_ready, link(Loc.DEVICE, Loc.HOST))
                slot.home_ready = None
            flat = slot.home[0] if slot.home is not None else None
        assert flat is not None, f"G{p} is not where its update runs"
        return [e.gview(flat) if got else None
                for e, got in zip(pack.layout.trainable, pack.got_grad)]

    def _wait_allreduce(self, p: int) -> None:
        if self.dp is not None:
            self.dp.wait(p)

    def _stage(self, p: int) -> None:
        """Start reading the first chunks of the master weights and optimizer state of ``p``
        for its update; the reads run while the pack's backward computes."""
        self.staged[p] = ChunkedUpdate(self, p)
        self.staged[p].stage()

    def _host_full(self) -> bool:
        """The host tier's ``when_full``: join the update in flight, whose bytes (a chunked
        update's reservation, a host-homed step's gradients) then come back; True if there
        was one. Never from the worker itself (it allocates only from its reservation)."""
        if self.worker is None or self.worker.pending is None or self.worker.on_thread():
            return False
        self.worker.join()
        return True
