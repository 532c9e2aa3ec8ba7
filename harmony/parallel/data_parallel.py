"""Data-parallel harmony: every rank runs the harmony schedule on its share of the batch.

``Trainer(..., parallel="data")`` under ``torchrun --nproc_per_node=N`` (or in a process group
the caller initialized). Like DDP, each rank passes its own batch to ``Trainer.step``; the step
is the step of one process on the concatenation of the ranks' batches (in rank order):

* loss weights: micro-batch m of rank r weighs ``samples(r, m) / global samples``, so the sum
  over every rank's micro-batches of weighted mean losses is the global batch's mean loss, also
  when the shards differ in size (each sample counts once, whichever rank holds it);
* gradients: each pack's flat gradient buffer is summed over the ranks by an asynchronous
  all-reduce started when the pack's last backward on this rank ends (``&G p`` in the
  schedule); what reads the gradient next (its copy to the host, the update, global-norm
  clipping) waits for it, so it overlaps the next pack's backward;
* randomness: micro-batch m of rank r is global micro-batch ``m + micro-batches of ranks < r``,
  and dropout masks derive from (seed, step, global micro-batch, layer), as in one process;
* the batch's loss is summed over the ranks before the first update, so every rank returns
  the global mean loss and takes the same decision on a non-finite one;
* plans: rank 0's pack boundaries and placement are used by every rank (the all-reduces must
  pair up pack for pack);
* checkpoints: rank 0 writes (the others wait for it and return the same folder); every rank
  can load (across machines, the folder must be on a shared file system);
* failure: an exception on one rank tears the process group down, so the other ranks' pending
  all-reduces fail at once instead of hanging (the group's timeout bounds a rank that stops
  without raising).

* sharded optimizer (``shard_optimizer=True``): each pack has an owner rank
  (:func:`schedules.data_parallel.owners`, balanced by optimizer-state bytes); its gradients
  are reduced onto the owner (``^G p``) instead of all-reduced, only the owner steps it, and
  the owner broadcasts the new weights (``*W p``, :meth:`DataParallel.start_broadcast`) into
  the other ranks' home copies, waited for by the next use of the pack's weights (its load in
  the next step, or the trainer reading weights between steps); clipping all-reduces the
  owners' summed squared norms (:meth:`DataParallel.all_sum`); checkpoints gather the shards
  (:meth:`DataParallel.gather_optimizer`) so rank 0 writes the whole optimizer state.

The results equal one process's up to rounding, not bit for bit: the all-reduce adds the
ranks' partial sums of micro-batch gradients, where one process adds the micro-batch
gradients one after the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from harmony.parallel import dist as hdist
from schedules.data_parallel import ALLREDUCE_LINK, BROADCAST_LINK, REDUCE_LINK, ring_bytes
from schedules.placement import Placement
from swap.engine import SwapEngine
from swap.handle import Handle
from swap.stats import Stats

PARALLEL_MODES = (None, "none", "data", "pipeline")  # "pipeline": harmony.parallel.pipeline


class DataParallel:
    """One rank's part of a data-parallel trainer: weights, all-reduces, agreement.

    Built by :meth:`create`; the trainer and runtime call it at a few points of a step (the
    runtime as :class:`harmony.runtime.hooks.DataParallelHooks`, passed in its options).

    Example::

        dp = DataParallel.create("data", torch.device("cpu"))   # under torchrun
        weights, offset = dp.loss_weights([4, 4])   # this rank's micro-batch sizes
    """

    def __init__(self, device: torch.device, group: hdist.Group, shard: bool = False) -> None:
        self.device, self.group, self.shard = device, group, shard
        self.pending: dict[int, list[Any]] = {}  # pack -> its all-reduces' work handles
        # pack -> its weights' broadcast and what to run once it arrived (sharded optimizer)
        self.broadcasts: dict[int, tuple[Any, Callable[[], None]]] = {}
        self.failed: str | None = None
        self._bandwidth: float | None = None
        # NCCL moves device memory only: host buffers travel through a device buffer
        self.via_device = group.backend == "nccl"

    @staticmethod
    def create(parallel: str | None, device: torch.device,
               shard: bool = False) -> DataParallel | None:
        """The data-parallel helper for ``Trainer(parallel=...)``, or None for one process.

        Raises:
            ValueError: an unknown ``parallel`` value, or ``"data"`` without a process group
                or torchrun environment (the message says how to launch).
        """
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={parallel!r} is unknown; use None (one process), 'data' "
                             "or 'pipeline' (several processes under torchrun)")
        if parallel != "data":
            return None
        device = hdist.local_device(device)
        return DataParallel(device, hdist.join(device, f"parallel={parallel!r}"), shard)

    # -- the step ---------------------------------------------------------------------------
    def loss_weights(self, sizes: list[int]) -> tuple[list[float], int]:
        """Each local micro-batch's share of the global samples, and the global index of this
        rank's first micro-batch (for randomness). Collective: every rank calls it each step.

        Args:
            sizes: samples per micro-batch of this rank's batch.
        """
        local = torch.tensor([sum(sizes), len(sizes)], dtype=torch.int64, device=self.device)
        everyone = [torch.zeros_like(local) for _ in range(self.group.world)]
        self._collective(lambda: dist.all_gather(everyone, local), "the batch sizes")
        counts = [(int(t[0]), int(t[1])) for t in everyone]
        total = sum(n for n, _ in counts)
        offset = sum(m for _, m in counts[:self.group.rank])
        return [n / total for n in sizes], offset

    def start(self, p: int, flat: torch.Tensor, entries: list[Any], stats: Stats) -> None:
        """Start summing pack ``p``'s gradients over the ranks, in place.

        Args:
            p: the pack. flat: its flat uint8 gradient buffer on the device.
            entries: its trainable layout entries (their gradients' dtypes and views).
            stats: counts the bytes on the ``"allreduce"`` link.

        :meth:`wait` must run before anything reads ``flat``.
        """
        nbytes = flat.numel() * flat.element_size()
        stats.count(ALLREDUCE_LINK, "G", ring_bytes(nbytes, self.group.world))
        self.pending[p] = self._sum(p, flat, entries, dist.all_reduce)

    def start_reduce(self, p: int, owner: int, flat: torch.Tensor, entries: list[Any],
                     stats: Stats) -> None:
        """Start summing pack ``p``'s gradients onto rank ``owner`` (sharded optimizer), in
        place; only the owner's ``flat`` holds the sum afterwards. Counts the gradient's
        bytes on the ``"reduce"`` link. :meth:`wait` must run before anything reads ``flat``.
        """
        stats.count(REDUCE_LINK, "G", flat.numel() * flat.element_size())
        self.pending[p] = self._sum(p, flat, entries, partial(dist.reduce, dst=owner))

    def _sum(self, p: int, flat: torch.Tensor, entries: list[Any],
             collective: Callable[..., Any]) -> list[Any]:
        nbytes = flat.numel() * flat.element_size()
        # Gradients are kept in the master dtype where an entry has one (mixed precision
        # keeps fp32 gradients of low-precision weights), else in the weights' dtype.
        dtypes = {getattr(e, "master_dtype", e.dtype) for e in entries}
        if len(dtypes) == 1 and nbytes % next(iter(dtypes)).itemsize == 0:
            # One collective over the whole buffer (the alignment gaps hold zeros).
            tensors = [flat.view(next(iter(dtypes)))]
        else:  # several dtypes: one collective per tensor (``gview``: the gradient layout)
            tensors = [getattr(e, "gview", e.view)(flat) for e in entries]
        works = []
        for t in tensors:
            works.append(self._collective(partial(collective, t, async_op=True),
                                          f"pack {p}'s gradients"))
        return works

    def start_broadcast(self, p: int, owner: int, buf: torch.Tensor, engine: SwapEngine,
                        done: Callable[[Handle | None], None] | None = None) -> None:
        """Start sending pack ``p``'s weights ``buf`` (flat uint8) from rank ``owner`` into
        every other rank's ``buf``; ``done(read)`` runs once they arrived (in
        :meth:`finish_broadcasts`), with ``read`` the copy that reads a host ``buf`` on its
        way to a device buffer (None: none), which the owner keeps ``buf`` for until it is
        done. Counts the bytes on the ``"broadcast"`` link.

        A host ``buf`` under NCCL travels through a device buffer: copies through ``engine``
        (on the owner to the device, ordered before the broadcast, which NCCL issues after
        the compute stream's work; on the others back to ``buf``, synchronized before
        ``done``, since the host then reads or writes ``buf``). Otherwise the collective reads
        or writes ``buf`` itself (the host must know no copy still touches it)."""
        engine.stats.count(BROADCAST_LINK, "W", buf.numel() * buf.element_size())
        target, read = buf, None
        mine = self.group.rank == owner
        if self.via_device and buf.device.type == "cpu":
            target = torch.empty_like(buf, device=self.device)
            if mine:
                read = engine.copy(target, buf, "host->device", "W")
                engine.wait(read, "host->device")
        elif buf.device.type == "cpu":  # the collective runs on the host
            if mine:
                engine.host_read(buf, f"pack {p}'s weights (broadcast)")
            else:
                engine.host_write(buf, f"pack {p}'s weights (broadcast)")

        def finish(then: Callable[[Handle | None], None] | None = done) -> None:
            if target is not buf and not mine:  # (the arrived bytes, into the host copy)
                engine.host_write(buf, f"pack {p}'s weights (broadcast)")
                engine.synchronize(engine.copy(buf, target, "device->host", "W"),
                                   "device->host")
            if then is not None:
                then(read)
        work = self._collective(partial(dist.broadcast, target, src=owner, async_op=True),
                                f"pack {p}'s weights")
        self.broadcasts[p] = (work, finish)

    def send_masters(self, p: int, flat: torch.Tensor) -> None:
        """Send pack ``p``'s fp32 masters (this rank owns it) to every rank. Collective."""
        self._broadcast_now(p, flat.clone(), self.group.rank)

    def receive_masters(self, p: int, owner: int, nbytes: int) -> torch.Tensor:
        """Pack ``p``'s fp32 masters from its ``owner`` (a flat uint8 CPU buffer). Collective."""
        return self._broadcast_now(p, torch.empty(nbytes, dtype=torch.uint8), owner)

    def _broadcast_now(self, p: int, buf: torch.Tensor, owner: int) -> torch.Tensor:
        target = buf.to(self.device) if self.group.backend == "nccl" else buf
        self._collective(lambda: dist.broadcast(target, src=owner), f"pack {p}'s masters")
        return target.cpu()

    def finish_broadcast(self, p: int) -> None:
        """Wait for pack ``p``'s weight broadcast and run what follows it."""
        work, done = self.broadcasts.pop(p)
        self._collective(work.wait, f"pack {p}'s weights")
        done()

    def finish_broadcasts(self) -> None:
        """Wait for every weight broadcast of the step and run what follows each."""
        while self.broadcasts:
            self.finish_broadcast(next(iter(self.broadcasts)))

    def all_sum(self, value: float) -> float:
        """The sum of ``value`` over the ranks (float64). Collective."""
        buf = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._collective(lambda: dist.all_reduce(buf), "a sum")
        return float(buf.item())

    def gather_optimizer(self, tensors: Mapping[str, torch.Tensor], scalars: dict[str, Any],
                         groups: dict[int, Any], scheduler: Any,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[Any], Any]:
        """Every rank's shard of the optimizer state merged, on every rank (sharded
        optimizer). Collective.

        Args:
            tensors, scalars: this rank's state tensors and scalars by ``key/name``.
            groups: this rank's packs' parameter-group settings by pack index.
            scheduler: this rank's learning-rate scheduler state (None if it owns no pack).

        Returns:
            all tensors (on the CPU), all scalars, every pack's groups in pack order, and the
            first rank's non-None scheduler state.
        """
        mine = ({k: v.cpu() for k, v in tensors.items()}, scalars, groups, scheduler)
        everyone: list[Any] = [None] * self.group.world
        self._collective(lambda: dist.all_gather_object(everyone, mine), "the optimizer state")
        all_t: dict[str, torch.Tensor] = {}
        all_s: dict[str, Any] = {}
        all_g: dict[int, Any] = {}
        sched = None
        for t, s, g, sc in everyone:
            all_t.update(t)
            all_s.update(s)
            all_g.update(g)
            sched = sched if sched is not None else sc
        return all_t, all_s, [all_g[i] for i in sorted(all_g)], sched

    def wait(self, p: int) -> None:
        """Wait for pack ``p``'s all-reduce, if one is running (a no-op otherwise)."""
        for work in self.pending.pop(p, []):
            self._collective(work.wait, f"pack {p}'s gradients")

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's loss from this rank's share of it (a float64 CPU scalar)."""
        buf = loss.detach().to(self.device, torch.float64).reshape(1)
        self._collective(lambda: dist.all_reduce(buf), "the loss")
        return buf.cpu().reshape(())

    def abandon(self) -> None:
        """End the all-reduces of a failed or skipped step before their gradient buffers go
        back to the pool (a late sum must not land in a reused buffer). Errors are dropped:
        the step already failed, and a broken group fails them at once."""
        for works in self.pending.values():
            for work in works:
                with contextlib.suppress(Exception):
                    work.wait()
        self.pending.clear()
        for p in list(self.broadcasts):  # (the last step's weights: they still arrive)
            with contextlib.suppress(Exception):
                self.finish_broadcast(p)
        self.broadcasts.clear()

    # -- planning ---------------------------------------------------------------------------
    def planning(self, bandwidth: dict[str, float]) -> tuple[dict[str, float], int, int]:
        """The planner's bandwidths with this rank's all-reduce rate added (measured once,
        collectively, on the first call), the number of ranks and of ranks on this machine
        (which share its host and NVMe links: :func:`harmony.planning.planner.plan` divides
        those)."""
        if self._bandwidth is None:
            self._bandwidth = self._collective(lambda: hdist.measure_allreduce(self.device),
                                               "the bandwidth probe")
        return ({**bandwidth, ALLREDUCE_LINK: max(self._bandwidth, 1.0)}, self.group.world,
                self.group.local_world)

    def agree(self, bounds: tuple[tuple[int, int], ...], placement: Placement,
              forward_group: int = 1, update_chunk: int | None = None,
              ) -> tuple[tuple[tuple[int, int], ...], Placement, int, int | None] | None:
        """Rank 0's pack boundaries, placement, forward group size and update chunk budget
        when they differ from this rank's (None when they are the same): every rank must run
        the same packs (group the same forwards, so that every rank rounds alike, and split
        NVMe-homed packs into the same chunks, which a sharded optimizer's broadcast sends one
        by one). Collective."""
        mine = [[list(b) for b in bounds], placement.to_json(), forward_group, update_chunk]
        box: list[Any] = [mine]
        self._collective(lambda: dist.broadcast_object_list(box, src=0), "the plan")
        if box[0] == mine:
            return None
        return (tuple(tuple(b) for b in box[0][0]), Placement.from_json(box[0][1]),
                int(box[0][2]), box[0][3])

    # -- checkpoints and failure ------------------------------------------------------------
    def save(self, write: Callable[[], Path], what: str = "the checkpoint") -> Path:
        """Rank 0 runs ``write``; every rank returns the folder it wrote (or raises its error,
        naming ``what`` was written). Collective."""
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.group.rank == 0:
            try:
                box[0] = str(write())
            except BaseException as err:  # the others must hear of it, not wait
                error, box[0] = err, f"!{type(err).__name__}: {err}"
        self._collective(lambda: dist.broadcast_object_list(box, src=0), what)
        if error is not None:
            raise error
        if box[0].startswith("!"):
            raise OSError(f"rank 0 failed to write {what} ({box[0][1:]})")
        return Path(box[0])

    @contextlib.contextmanager
    def failing_together(self, passes: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Run a step; if it raises (other than ``passes``, which every rank raises alike),
        tear the process group down so no other rank waits on this one."""
        if self.failed is not None:
            raise RuntimeError(self.failed)
        try:
            yield
        except passes:
            raise
        except BaseException as err:
            self.failed = (f"rank {self.group.rank}: a data-parallel step failed "
                           f"({type(err).__name__}: {err}); the process group is gone, so this "
                           "trainer cannot step again: restart the job from a checkpoint")
            self.pending.clear()
            self.broadcasts.clear()
            hdist.abort(self.group)
            raise

    def close(self) -> None:
        """Drop pending all-reduces; the group stays for other trainers of this process."""
        self.pending.clear()
        self.broadcasts.clear()

    def _collective(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except RuntimeError as err:
            raise RuntimeError(
                f"rank {self.group.rank}: the data-parallel exchange of {what} failed: another "
                f"rank failed or stopped answering ({err})") from err
