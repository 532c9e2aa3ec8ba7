"""The runtime: interprets a lowered schedule, one task at a time.

The schedule says what happens when; the runtime only does it, handing each task to the one
object that owns what the task touches:

* :class:`~harmony.runtime.values.Values`: the step's activations and their gradients (X, D, S);
* :class:`~harmony.runtime.gradients.Gradients`: the packs' gradients (G);
* :class:`~harmony.runtime.weights.DeviceWeights`: the packs' weights on the device (W);
* :class:`~harmony.runtime.updates.UpdatePath`: the optimizer steps (U), with the update
  worker, staged NVMe updates and a sharded optimizer's broadcasts;
* :class:`~harmony.runtime.compute.Compute`: forwards and backwards (F, B);
* :class:`~harmony.runtime.nvme_io.NvmeIO`: every NVMe read and write, and the writes a step
  waits for before it succeeds.

What belongs to one step is a :class:`~harmony.runtime.step.StepState`, made fresh by each
:meth:`Runtime.run`. Data moves go through the swap engine and return handles; a compute task
first waits for the handles of what it reads (docs/design.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from harmony.model.layout import Entry
from harmony.runtime.batch import Batch
from harmony.runtime.checks import NonFiniteLoss as NonFiniteLoss  # (raised by an update)
from harmony.runtime.compute import Compute
from harmony.runtime.gradients import Gradients
from harmony.runtime.homes import homes
from harmony.runtime.nvme_io import NvmeIO
from harmony.runtime.options import RuntimeOptions
from harmony.runtime.options import StepData as StepData  # (the runtime's step input)
from harmony.runtime.pack import Pack
from harmony.runtime.step import StepExchange, StepState
from harmony.runtime.tied import TiedCopies
from harmony.runtime.timeline import Clock, clock_for
from harmony.runtime.update_worker import UpdateWorker
from harmony.runtime.updates import UpdatePath
from harmony.runtime.values import Values
from harmony.runtime.weights import DeviceWeights
from schedules.schedule import Schedule
from schedules.simulate import Sizes
from schedules.task import Kind, Loc, Op, Task
from swap.engine import SwapEngine
from swap.nvme import NvmeStore
from swap.tier import Tier

PHASES = {Op.FWD: "forward", Op.BWD: "backward", Op.UPD: "update", Op.SEND: "comm",
          Op.RECV: "comm"}  # (every other task is a swap)


class Runtime:
    """Runs lowered schedules over a fixed set of packs.

    Args:
        packs: the packs, in chain order. tiers: the tier of each location.
        engine: the swap engine. options: how steps run (loss, device, seed, precision,
        clipping, ties, parallelism, ...). store: the NVMe store, if any.

    Example::

        runtime = Runtime(packs, tiers, engine, RuntimeOptions(loss_fn=loss, device=device))
        loss = runtime.run(plan.schedule, plan.sizes, StepData(xs, ys, weights, False), 0, {})
    """

    def __init__(self, packs: Sequence[Pack], tiers: dict[Loc, Tier], engine: SwapEngine,
                 options: RuntimeOptions, store: NvmeStore | None = None) -> None:
        self._packs, self._tiers, self._engine, self._options = list(packs), tiers, engine, options
        self._dev = tiers[Loc.DEVICE]
        worker = UpdateWorker(engine.stats) if options.overlap_updates else None
        self._io = NvmeIO(store, engine, tiers[Loc.HOST])
        self._homes = homes(tiers, engine, self._io)
        self._grads = Gradients(self._packs, tiers, engine, options.dp)
        self._weights = DeviceWeights(self._packs, self._homes, self._dev, engine, options.dp,
                                      worker, options.changing)
        self._values = Values(self._dev, self._homes, engine, lambda: [
            *self._grads.device_buffers(), *self._weights.device_buffers()])
        self._ties = TiedCopies(options.ties, self._packs, self._grads, self._weights,
                                self._homes, tiers, engine) if options.ties is not None else None
        self._updates = UpdatePath(self._packs, tiers, engine, self._io, self._homes,
                                   self._grads, self._weights, self._ties, worker, options)
        self._compute = Compute(self._packs, self._dev, self._values, self._grads,
                                self._weights, self._updates, options)
        self._clock: Clock = clock_for(options.device)  # (times the tasks of a recorded step)
        self._step: StepState | None = None  # the last step run (or running)
        self._staging: bool | None = None  # stage_batch, if set (else the options say)
        tiers[Loc.HOST].when_full = self.host_full
        # checking mode (HARMONY_COPIER=deferred): the tiers check their buffers' lifetimes
        engine.watch(tiers.values(), device=tiers[Loc.DEVICE])

    # -- what others read ---------------------------------------------------------------------
    @property
    def packs(self) -> list[Pack]:
        """The packs, in chain order."""
        return self._packs

    @property
    def tiers(self) -> dict[Loc, Tier]:
        """The tier of each location."""
        return self._tiers

    @property
    def options(self) -> RuntimeOptions:
        """How steps run."""
        return self._options

    @property
    def changing(self) -> frozenset[int] | None:
        """Ids of the buffers a forward changes (None: every buffer is assumed to)."""
        changing = self._options.changing
        return None if changing is None else frozenset(changing)

    def changing_buffers(self, p: int) -> list[Entry]:
        """Pack ``p``'s buffers that a forward changes, which the runtime carries home."""
        return self._weights.changing(p)

    @property
    def stage_batch(self) -> bool:
        """Whether a step first copies its inputs and targets into host-tier buffers (see
        :mod:`harmony.runtime.batch`): as the options say, by default where the host tier is
        pinned. Settable between steps, to force staging where the host tier is not pinned
        (checks of the staging on CPU)."""
        staged = self._options.stage_batch if self._staging is None else self._staging
        return self._tiers[Loc.HOST].pin if staged is None else staged

    @stage_batch.setter
    def stage_batch(self, value: bool) -> None:
        self._staging = value

    @property
    def loss(self) -> torch.Tensor:
        """The last step's loss (a float64 scalar; zero before any step)."""
        if self._step is None:
            return torch.zeros((), dtype=torch.float64)
        return self._step.loss

    @property
    def updated(self) -> list[int]:
        """The packs the last step updated, in order (all of them once it succeeded; some
        after a failure part-way)."""
        return list(self._step.updated) if self._step is not None else []

    @property
    def targets(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The last step's targets still staged in host memory (none once it is done)."""
        return dict(self._step.batch.staged) if self._step is not None else {}

    @property
    def grad_norm(self) -> float:
        """The global gradient norm the last clipping saw."""
        return self._updates.grad_norm

    @property
    def ties(self) -> TiedCopies | None:
        """The runtime's side of tied weights (None: no parameter is used by two packs)."""
        return self._ties

    def owns(self, p: int) -> bool:
        """Whether this rank updates pack ``p`` (always, unless the optimizer is sharded)."""
        return self._updates.owns(p)

    def host_full(self) -> bool:
        """The host tier's ``when_full``: join the update in flight, whose bytes then come
        back; True if there was one (see :meth:`UpdatePath.host_full`)."""
        return self._updates.host_full()

    def close(self) -> None:
        """Stop the update worker, if any."""
        self._updates.close()

    # -- the step -----------------------------------------------------------------------------
    def run(self, schedule: Schedule, sizes: Sizes, data: StepData, step: int,
            seconds: dict[str, float], *, mb_offset: int = 0,
            record: list[dict[str, object]] | None = None) -> float:
        """Run one step; returns the batch's mean loss.

        Args:
            schedule: the lowered schedule (with its placement). sizes: its sizes.
            data: the micro-batches. step: the step's number (randomness derives from it).
            seconds: where each phase's seconds are added (forward, backward, ...).
            mb_offset: the global index of the first micro-batch (data parallelism:
                randomness follows global micro-batch indices).
            record: if given, each task's text, start and end (seconds since the step began)
                and the bytes each tier held after it are appended (``Trainer.record_step``).

        Raises:
            NonFiniteLoss: the batch's loss is NaN or infinite (nothing was updated).
            Whatever a task raised; the step's transient values are then dropped.
        """
        assert schedule.placement is not None
        batch = Batch(data, self._tiers[Loc.HOST], self._engine, self._options.device)
        state = self._step = StepState(
            schedule, sizes, data, step, mb_offset, batch, record=record,
            loss=torch.zeros((), dtype=torch.float64, device=self._options.device))
        if self._ties is not None:  # refuses a schedule updating an owner too early
            self._ties.start(schedule)
        batch.put_inputs(self._values)
        # record: each task's start and end, from marks on the device's clock (events on
        # CUDA) read after the step's device synchronization; the tiers' bytes after it
        clock = self._clock if record is not None else None
        begin = clock.mark() if clock is not None else None
        try:
            if self.stage_batch:  # (a failure here gives back what was staged: abandon)
                batch.stage(self._values)
            for task in schedule.tasks:
                m0 = clock.mark() if clock is not None else None
                t0 = time.perf_counter()
                self._dispatch(task, state)
                t1 = time.perf_counter()
                name = PHASES.get(task.op, "swap")
                seconds[name] = seconds.get(name, 0.0) + t1 - t0
                if clock is not None:
                    state.marks.append((task, m0, clock.mark(), {
                        loc.value: tier.used for loc, tier in self._tiers.items()}))
            self._updates.end_step()  # the last overlapped step, before anyone reads
            # A step succeeds only once what it wrote behind is on disk: a failed write
            # surfaces here, not silently in a later step.
            self._io.wait_writes()
            # ... and once the device ran all of it: an error of a copy or a kernel surfaces
            # in this step (on CUDA, one device synchronization per step).
            self._engine.synchronize_all()
            self._weights.end_step()
            if clock is not None and record is not None:
                record.extend({"task": str(task), "start": clock.seconds(begin, m0),
                               "end": clock.seconds(begin, m1), "bytes": held}
                              for task, m0, m1, held in state.marks)
        except BaseException:
            if self._options.dp is not None:
                self._options.dp.abandon()
            self.abandon()  # (first waits for the update worker, which may still write)
            self._io.forget_writes()
            raise
        return float(state.loss)

    def _dispatch(self, task: Task, step: StepState) -> None:
        op, p = task.op, task.pack
        if op is Op.FWD:
            self._compute.forward(task, step)
        elif op is Op.BWD:
            self._compute.backward(task, step)
        elif op is Op.UPD:
            self._updates.update(p, step)
        elif op is Op.ALLREDUCE:  # data parallelism: sum G over the ranks, asynchronously
            dp = self._options.dp
            assert dp is not None, f"{task} needs parallel='data'"
            dp.start(p, self._grads.device(p), self._packs[p].layout.trainable,
                     self._engine.stats)
        elif op is Op.REDUCE:  # sharded optimizer: sum G onto the pack's owner
            dp, owners = self._options.dp, self._options.owners
            assert dp is not None and owners is not None, f"{task} needs sharding"
            dp.start_reduce(p, owners[p], self._grads.device(p),
                            self._packs[p].layout.trainable, self._engine.stats)
        elif op is Op.BROADCAST:  # sharded optimizer: the owner's new W to every rank
            self._updates.broadcast(p)
        elif op.is_comm:  # a pipeline rank's SEND/RECV (harmony.parallel.pipeline)
            assert self._options.comm is not None, f"{task}: this runtime is not a pipeline rank"
            self._options.comm(task, StepExchange(step, self._values, self._engine,
                                                  self._options.device))
        elif task.kind is Kind.W:
            self._dispatch_weights(task)
        elif task.kind is Kind.G:
            self._dispatch_grads(task, step)
        elif op is Op.SWAP_IN:
            self._values.swap_in(task.ref)
        elif op is Op.SWAP_OUT:
            self._values.swap_out(task.ref, step.placement.home(task.ref.kind, p))
        elif op is Op.FREE:
            self._values.drop(task.ref, home_too=False)
        elif op is Op.DEL:
            self._values.drop(task.ref, home_too=True)

    def _dispatch_weights(self, task: Task) -> None:
        if task.op is Op.SWAP_IN:
            self._weights.load(task.pack)
        elif task.op is Op.FREE:
            self._weights.free(task.pack)
        else:
            raise ValueError(f"{task}: weights on the device are never written back")

    def _dispatch_grads(self, task: Task, step: StepState) -> None:
        p = task.pack
        if task.op is Op.SWAP_IN:
            self._grads.load(p, step.placement.update_loc(p))
        elif task.op is Op.SWAP_OUT:
            self._grads.store(p, step.placement.update_loc(p))
        elif task.op is Op.FREE:
            raise ValueError(f"~{task.ref}: gradients are never dropped, only stored or deleted")
        elif task.op is Op.DEL:
            self._updates.delete_grads(p)

    def abandon(self) -> None:
        """Drop every transient value after a failed step (weights stay at home).

        Cleanup errors (say, more failed writes after a full disk) must not hide the error
        that ended the step, so each is suppressed here."""
        self._updates.abandon_worker()  # (its step may still read the gradients)
        self._values.abandon()
        self._grads.abandon()
        self._weights.abandon()
        self._updates.abandon()
        if self._step is not None:  # (staged, never copied)
            self._step.batch.abandon()
        if self._ties is not None:
            self._ties.abandon()
