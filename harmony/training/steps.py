"""A trainer's steps: the plan each batch shape runs under, the packs built for it, and one
step's run on them.

``Trainer.step`` hands its batch to :meth:`Steps.run`: the batch is split into micro-batches
(their size chosen by the planner for ``micro_batch_size="auto"``); the first step profiles,
plans and builds the packs (a :class:`~harmony.training.built.Built`); a batch of a new shape
is planned within them, or, where it does not fit, the training state is re-homed to packs
built from a fresh plan (the same keyed hand-over as save and load, in memory); the runtime
runs the plan's schedule; and the step's bookkeeping follows (fp16's loss scale, the step
count, the learning-rate schedulers, the peaks).

The trainer passes its own ``_profile`` and ``_rehome`` methods in, so that every profile and
every re-home goes through the trainer, which can be watched there.

Example::

    steps = Steps(config, holdings, planner, state_io, facts, loss_fn, optimizer_factory)
    loss = steps.run(x, y, trainer._profile, trainer._rehome)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harmony.model.layout import Layout
from harmony.model.precision import GradientOverflow
from harmony.model.probe import check_chain
from harmony.planning.device_memory import ReservedPeak
from harmony.planning.plan import InfeasiblePlan, Plan
from harmony.planning.refusals import refuse_nvme_space
from harmony.runtime.runtime import NonFiniteLoss, StepData
from harmony.training.batch import StepBatch
from harmony.training.built import BuildSetup, Built, ShapeKey
from schedules.task import Loc

log = logging.getLogger("harmony")

if TYPE_CHECKING:
    from harmony.training.config import OptimizerFactory, TrainerConfig
    from harmony.training.holdings import Holdings
    from harmony.training.planner import Profile, TrainerPlanner
    from harmony.training.recording import Recorder
    from harmony.training.setup import ModelFacts
    from harmony.training.state_io import Spilled, StateIO

__all__ = ["Rehome", "Steps"]

# Re-homes the training state for a batch shape that the packs cannot hold; returns its plan
# (``Trainer._rehome``, which calls :meth:`Steps.rehome`).
Rehome = Callable[[tuple[torch.Tensor, ...], torch.Tensor, list[int], ShapeKey], Plan]


class Steps:
    """Runs a trainer's steps and keeps what they change (see the module docstring).

    Args:
        config: the trainer's settings. holdings: its surroundings. planner: its planner.
        state_io: its state I/O (a re-home reads the state out and hands it to new packs).
        facts: the model's facts. loss_fn, optimizer_factory: as the trainer was given them.
        recorder: records a step for ``record_step``.

    Attributes:
        built: what lives under the current plan (None before the first step, and while a
            re-home builds anew).
        plan: the plan of the last step (None before the first step).
        count: optimizer steps taken.
        broken: why stepping on would train on inconsistent weights (None while they are
            those of one step).
        micro_batch_size_used: the micro-batch size of the last step.
    """

    def __init__(self, config: TrainerConfig, holdings: Holdings, planner: TrainerPlanner,
                 state_io: StateIO, facts: ModelFacts, loss_fn: Callable[..., torch.Tensor],
                 optimizer_factory: OptimizerFactory, recorder: Recorder) -> None:
        self.config, self.holdings, self.planner, self.io = config, holdings, planner, state_io
        self.facts, self.loss_fn, self.optimizer_factory = facts, loss_fn, optimizer_factory
        self.recorder = recorder
        self.built: Built | None = None
        self.plan: Plan | None = None
        self.count = 0
        self.broken: str | None = None
        self.micro_batch_size_used: int | None = None
        self.layouts = facts.layouts  # the layers' layouts while no packs are built
        self._check_chain = config.check_chain  # (the probe runs before the first step)
        self._reserved = ReservedPeak(holdings.device)  # started once the first plan is made
        # The budgets (device, host) the packs were built under; the trainer's may be set
        # between steps, and the next step then plans afresh under them.
        self.budgets: tuple[int | None, int | None] | None = None
        self._spilled: Path | None = None  # a re-home's state on disk, until built from

    @property
    def layer_layouts(self) -> list[Layout]:
        """The layers' layouts now (the packs' once built: tied weights split)."""
        return self.built.layouts if self.built is not None else self.layouts

    @property
    def lr_schedulers(self) -> list[Any]:
        return self.built.lr_schedulers if self.built is not None else []

    # -- one step ----------------------------------------------------------------------------
    def refuse_if_broken(self, what: str, intact: str) -> None:
        """RuntimeError if a step failed part-way (the weights mix two steps): ``what`` is
        refused, and the message says what is ``intact``."""
        if self.broken is not None:
            raise RuntimeError(f"{what} refused: {self.broken}. Nothing was written; {intact}")

    def run(self, inputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
            profile: Profile, rehome: Rehome) -> float:
        """One optimizer step over the batch (``Trainer.step``); returns its mean loss."""
        h = self.holdings
        if self.broken is not None:
            raise RuntimeError(self.broken)
        h.chain.note_input(inputs)  # (an nn.Sequential passes a tuple input as one argument)
        t0 = time.perf_counter()
        given = self.config.micro_batch_size
        mbs = given if isinstance(given, int) else self.planner.micro_batch_size(
            inputs, targets, profile, first=self.built is None)
        batch = StepBatch.split(inputs, targets, mbs)
        self.micro_batch_size_used = mbs
        batch.check_device(h.device)
        x, y = batch.inputs[0], batch.targets[0]
        if self._check_chain:  # does the chain compute what the model computes? (once)
            check_chain(h.chain, x, batch.single)
            self._check_chain = False
        sizes, key = batch.sizes, batch.key
        # A profile checks each layer for forward groups on the first two micro-batches.
        self.planner.second_input = batch.second
        if self.built is None:  # (micro_batch_size='auto' planned this batch already)
            t_plan = time.perf_counter()
            self.first(x, y, sizes, key, self.planner.auto_plan, profile)
            self.planner.auto_plan = None
            assert self.built is not None
            self.recorder.planning_seconds = time.perf_counter() - t_plan
        plan_ = self.built.plans.get(key)
        if self.budgets != self._budgets_now():  # set between steps: new packs fit them
            plan_ = rehome(x, y, sizes, key)
        elif plan_ is None:
            plan_ = self._replan(x, y, sizes, key, profile, rehome)
        self.plan = plan_
        loss = self._run(plan_, batch)
        self._book_peaks()
        h.stats.seconds["step"] += time.perf_counter() - t0
        return loss

    def _run(self, plan_: Plan, batch: StepBatch) -> float:
        """Run ``plan_``'s schedule over ``batch`` and book the step (or skip it: an fp16
        overflow, a non-finite loss with ``nonfinite="skip"``)."""
        h = self.holdings
        assert self.built is not None
        runtime, weights = self.built.runtime, batch.weights
        dp, pipeline = h.dp, h.pipeline
        mb_offset = 0
        if dp is not None:  # global loss weights and micro-batch numbers
            weights, mb_offset = dp.loss_weights(batch.sizes)
        data = StepData(batch.inputs, batch.targets, weights, batch.single)
        if pipeline is not None:  # later stages receive their inputs
            data = pipeline.step_data(data)
        step = self.count
        # The host tier keeps to the plan's predicted level: above it, a request first waits
        # for buffers still being written back (a disk slower than planned), not for nothing.
        h.tiers[Loc.HOST].plan_for(plan_.predicted.peak.get(Loc.HOST))
        try:
            loss = runtime.run(plan_.schedule, plan_.sizes, data, self.count, h.stats.seconds,
                               mb_offset=mb_offset, record=self.recorder.tasks)
            if pipeline is not None:
                pipeline.finish()
            # The step's bookkeeping belongs to it: an interrupt here (every pack updated, the
            # count or the schedulers not) leaves the trainer as inconsistent as one between
            # two packs' updates.
            h.precision.update_scale(overflow=False)
            self.count += 1
            for scheduler in self.lr_schedulers:
                scheduler.step()
        except GradientOverflow:  # fp16: nothing was updated; retry later at a lower scale
            h.precision.update_scale(overflow=True)
            h.stats.skipped_steps += 1
            return float(runtime.loss)
        except NonFiniteLoss as err:
            if self.config.nonfinite == "skip":
                h.stats.skipped_steps += 1
                return err.loss
            raise
        except BaseException as err:
            if runtime.updated:  # some packs took the step, others did not
                self.broken = (
                    f"step {step} failed ({type(err).__name__}: {err}) after updating packs "
                    f"{runtime.updated}; the weights are no longer those of one "
                    "consistent step: load() a checkpoint before training on")
            raise
        return loss

    def _book_peaks(self) -> None:
        """Each tier's peak into the stats, and the busy and stall times whose events were
        reached (CUDA)."""
        h = self.holdings
        for loc, tier in h.tiers.items():
            h.stats.peak_bytes[loc.value] = max(h.stats.peak_bytes.get(loc.value, 0), tier.peak)
        h.engine.settle()
        if h.device.type == "cuda":  # what the caching allocator reserved, beside "device"
            h.stats.peak_bytes["device reserved"] = self._reserved.peak
            if h.tiers[Loc.HOST].pinned is not None:
                h.stats.peak_bytes["host pinned"] = h.tiers[Loc.HOST].pinned or 0

    # -- moving between plans ----------------------------------------------------------------
    def profile(self, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        """Profile the layers on ``(x, y)`` with their current values (the planner keeps the
        profiles)."""
        self.planner.profile(x, y, self.built, self.layer_layouts)

    def first(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
              key: ShapeKey, chosen: Plan | None, profile: Profile) -> None:
        """Profile, plan (unless ``chosen`` is given) and build the packs and the runtime."""
        h, planner = self.holdings, self.planner
        if chosen is None:
            chosen = planner.first(x, y, sizes, profile)
        chosen = planner.agreed(chosen, sizes)  # (data parallelism: every rank's the same)
        if self._reserved.base is None:  # the profile's and the probe's blocks are freed now
            self._reserved.start()
        if h.store is not None:  # the disk must hold what the plan puts there
            refuse_nvme_space(chosen, h.store.root, held=h.store.used_bytes)
        # Building is all or nothing (harmony.training.built); a failed build leaves the
        # pending optimizer and scheduler state for the next try.
        optimizer = self.io.optimizer
        pending = optimizer.pending, optimizer.pending_scheduler
        setup = BuildSetup(self.config, self.loss_fn, self.optimizer_factory, self.layouts,
                           planner.k_ratio, self.facts.shared, self.facts.params,
                           planner.changing, self.facts.origin_device)
        # The tiers hold what the budgets allow (set between steps, they changed the plan).
        budgets = self._budgets_now()
        h.tiers[Loc.DEVICE].set_capacity(budgets[0])
        h.tiers[Loc.HOST].set_capacity(budgets[1])
        try:
            self.built = Built.build(chosen, key, h, setup, optimizer.apply)
        except BaseException:
            optimizer.pending, optimizer.pending_scheduler = pending
            raise
        self.budgets = budgets
        # The packs hold the values now: a re-plan takes the trained ones, not init= or the
        # weights= files (a failed build above gives the next try the same values again).
        h.materializer.done()
        self._drop_spill()  # (a re-home's files: read now)

    def _budgets_now(self) -> tuple[int | None, int | None]:
        """The trainer's budgets now (device, host)."""
        return self.planner.device_memory, self.planner.host_memory

    def _replan(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                key: ShapeKey, profile: Profile, rehome: Rehome) -> Plan:
        assert self.built is not None and self.plan is not None
        try:
            chosen = self.planner.within(x, y, sizes, key, next(iter(self.built.plans)),
                                         self.plan, profile)
        except InfeasiblePlan:
            if self.holdings.pipeline is not None:  # (the stages are agreed between ranks once)
                raise
            # These shapes need more room than the packs built for the first ones leave
            # (say, longer sequences after packs were kept resident): plan afresh and move
            # the training state to the new packs' homes.
            return rehome(x, y, sizes, key)
        self.built.plans[key] = chosen
        return chosen

    def rehome(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
               key: ShapeKey, profile: Profile) -> Plan:
        """Rebuild the packs from a fresh plan for these shapes, keeping weights, optimizer
        and scheduler state (the same keyed hand-over as save/load). With an NVMe directory
        the state goes through files there, one pack in memory at a time (:meth:`_spill`);
        otherwise (it is in memory already) through memory."""
        h, built, optimizer = self.holdings, self.built, self.io.optimizer
        assert built is not None
        sharded = h.dp is not None and h.dp.shard
        chosen = self.planner.fresh(x, y, sizes, profile)  # (raises: nothing changed)
        spilled: Spilled | None = None
        if h.store is not None and not sharded and h.pipeline is None:
            spilled = self._spill(built)  # (None: the disk is full)
        if spilled is None:  # through memory
            weights = self.io.state_dict(built)
            optimizer_state = optimizer.gather(built) if sharded else optimizer.read(built)
            scheduler_state = optimizer.gathered_scheduler if sharded \
                else optimizer.scheduler(built)
        else:
            optimizer_state, scheduler_state = spilled.optimizer, spilled.scheduler
        built.release({id(v) for v in h.model_tensors().values()})
        self.built = None
        with torch.no_grad():
            for k, v in h.model_tensors().items():
                if spilled is None:
                    v.data = weights[k].to(v.device)
                else:  # the shape and dtype alone: the new packs read the value from the file
                    spec = spilled.specs[k]
                    v.data = torch.zeros((), dtype=spec.dtype, device=v.device).expand(spec.shape)
        if spilled is not None:
            h.materializer.use_weights(spilled.weights_file)
        # (after the values are back: a layout takes each tensor's shape)
        self.layouts = [Layout([m], h.precision.dtype_of) for m in h.chain.layers]
        optimizer.pending, optimizer.pending_scheduler = optimizer_state, scheduler_state
        self.planner.fixed = None
        self.first(x, y, sizes, key, chosen, profile)
        assert self.built is not None
        return self.built.plans[key]

    def _spill(self, built: Built) -> Spilled | None:
        """The training state written to a folder in the NVMe directory (kept until a build
        from it succeeds: a failed one tries again from the same files); None if the disk
        cannot hold it (the folder is removed)."""
        assert self.holdings.store is not None
        self._drop_spill()
        folder = Path(tempfile.mkdtemp(prefix="rehome-", dir=self.holdings.store.directory))
        try:
            spilled = self.io.spill(built, folder)
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("harmony: the re-home goes through memory: %s", err)
            return None
        self._spilled = folder
        return spilled

    def take_back_spilled(self) -> str | None:
        """After a re-home whose build failed (no packs; the state in the re-home's files, the
        model's tensors holding placeholders of their shapes): the model's tensors take their
        values from the files again, and the files go. Returns why they could not (None:
        they did, or there was nothing to take back)."""
        if self.built is not None or self._spilled is None:
            return None
        h = self.holdings
        try:
            with torch.no_grad():
                for v in h.model_tensors().values():
                    if h.materializer.direct(v):
                        v.data = h.materializer.value(v).to(v.device)
        except Exception as err:  # (an I/O error: the files go with the NVMe directory)
            return (f"a re-home's build failed and its files could not be read back ({err}); "
                    "the model does not hold the trained weights: load the last checkpoint")
        self._drop_spill()
        return None

    def _drop_spill(self) -> None:
        if self._spilled is not None:
            shutil.rmtree(self._spilled, ignore_errors=True)
            self._spilled = None
