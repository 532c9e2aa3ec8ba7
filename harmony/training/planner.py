"""How a :class:`harmony.Trainer` comes to its plans: it profiles the layers, asks the planner
for a plan of each batch shape, and chooses the micro-batch size when asked to.

The first plan is made on the first step (or kept from a ``plan=`` the trainer was given). A
batch of a new shape is planned within the packs already built (their bounds and placement),
after a new profile if its per-sample shapes are new; where no such plan fits the budgets the
trainer re-homes (:mod:`harmony.training.steps`) and :meth:`TrainerPlanner.fresh` plans
afresh. With ``micro_batch_size="auto"`` the largest size with a plan is chosen per batch
shape. Every plan is asked for with one :class:`~harmony.planning.request.PlanRequest` made
by :meth:`TrainerPlanner.request`, which a pipeline stage
(:meth:`harmony.parallel.pipeline.Pipeline.plan`) takes as well; plans use the host<->device
copy rate measured once per device
(:func:`~harmony.planning.bandwidth.measured_bandwidth`). Where a profile is needed the
trainer's ``profile`` function is passed in (:data:`Profile`): it knows what is built, so the
layers' current values are the ones profiled.

Example::

    planner = TrainerPlanner(config, holdings, loss_fn, given=None, k_ratio=2.0, tied=[],
                             device_memory=8 << 30, host_memory=None)
    planner.profile(x, y, None, layouts)          # before the packs are built
    chosen = planner.plan_for([4, 4, 4, 4], fixed=planner.fixed)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harmony.planning.bandwidth import measured_bandwidth
from harmony.planning.device_memory import check_fits, room_for_new_packs
from harmony.planning.groups import refuse_ungroupable
from harmony.planning.microbatch import split_batch
from harmony.planning.plan import Plan
from harmony.planning.planner import largest_micro_batch, plan
from harmony.planning.profile import UNCHECKED, profile_layers
from harmony.planning.request import Bounds, PlanRequest, Tied
from harmony.planning.sizes import parse_bytes
from schedules.task import Loc

if TYPE_CHECKING:
    from harmony.model.layout import Layout
    from harmony.training.built import Built, ShapeKey
    from harmony.training.config import TrainerConfig
    from harmony.training.holdings import Holdings
    from schedules.placement import Placement

__all__ = ["Profile", "TrainerPlanner", "given_plan"]

# Profiles the layers on one micro-batch ``(x, y)`` with the model's current values
# (:meth:`TrainerPlanner.profile`, run by the trainer, which knows what is built).
Profile = Callable[[tuple[torch.Tensor, ...], torch.Tensor], None]


def given_plan(config: TrainerConfig, layers: int) -> Plan | None:
    """The plan a trainer was given (``plan=``: a Plan, or the JSON file ``harmony report
    --json`` wrote), checked against the model's chain of ``layers`` layers and the settings.

    Raises:
        ValueError: the file is not such a plan, the plan covers another number of layers,
            or its forward groups differ from ``forward_micro_batch_size``'s.
    """
    given_setting = config.plan
    if given_setting is None:
        return None
    given = given_setting if isinstance(given_setting, Plan) else _load_plan(given_setting)
    if given.bounds[-1][1] != layers:
        raise ValueError(f"plan={given_setting!r} covers {given.bounds[-1][1]} layers but the "
                         f"model's chain has {layers}; make the plan for this "
                         "model (harmony report ... --json)")
    if config.forward_micro_batch_size is not None and config.forward_group != \
            given.forward_group:
        raise ValueError(f"forward_micro_batch_size={config.forward_micro_batch_size!r} but "
                         f"plan={given_setting!r} runs forwards over {given.forward_group} "
                         "micro-batch(es); drop one of the two")
    return given


def _load_plan(path: str | os.PathLike[str]) -> Plan:
    try:
        data = json.loads(Path(path).read_text())
        return Plan.from_json(data.get("plan", data))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"plan={str(path)!r} is not a plan written by harmony report --json "
                         f"({type(err).__name__}: {err})") from err


class TrainerPlanner:
    """Profiles, plans, re-plans and chooses micro-batch sizes for one trainer.

    Args:
        config: the trainer's settings.
        holdings: the trainer's surroundings (model, device, precision, process groups).
        loss_fn: the loss of one micro-batch (the profile runs it).
        given: the plan the trainer was given (:func:`given_plan`): its bounds and placement
            are kept for the first plan, its schedule, prefetch depth, forward groups and
            (for ``update_chunk="auto"``) chunks for every plan.
        k_ratio: optimizer-state bytes per parameter byte, as probed.
        tied: per weight used by several layers, (those layers, its gradient's bytes).
        device_memory, host_memory: the budgets plans must fit (bytes; None: no limit).

    Attributes:
        fixed: the bounds and placement the first plan keeps (None: the planner chooses).
        profiles: the layers' last profile (None before the first).
        changing: the buffers a forward changes, as the profiles found them.
        forward_group: micro-batches per forward (None: the planner chooses); with data
            parallelism, rank 0's choice once agreed.
        device_memory, host_memory: the budgets later plans must fit.
        auto_plan: with ``micro_batch_size="auto"``, the plan found choosing the first
            step's size, which that step builds (None once built).
    """

    def __init__(self, config: TrainerConfig, holdings: Holdings,
                 loss_fn: Callable[..., torch.Tensor], *, given: Plan | None, k_ratio: float,
                 tied: list[Tied], device_memory: int | None, host_memory: int | None) -> None:
        self.config = config
        self.holdings = holdings
        self.loss_fn = loss_fn
        self.tied = tied
        self.device_memory, self.host_memory = device_memory, host_memory
        self._k_ratio = k_ratio
        self.schedule_name = config.schedule
        self.prefetch = config.prefetch
        self.forward_group = config.forward_group
        self.update_chunk = config.update_chunk_budget
        self.fixed: tuple[Bounds, Placement] | None = None
        if given is not None:
            self.fixed = (given.bounds, given.placement)
            self.schedule_name, self.prefetch = given.schedule.name, given.schedule.prefetch
            self.forward_group = given.forward_group
            if self.update_chunk == "auto":  # the plan's chunks too
                self.update_chunk = given.update_chunk
        self.profiles: list[Any] | None = None
        self.changing: set[int] = set()
        # A profile checks each layer for forward groups on the first two micro-batches.
        self.second_input: tuple[torch.Tensor, ...] | None = None
        self._auto_sizes: dict[tuple[Any, ...], int] = {}  # budgets, batch shape -> size
        self.auto_plan: Plan | None = None  # the first step's, found choosing the size

    def set_budget(self, name: str, value: int | str | None, planned: bool) -> None:
        """Set ``device_memory`` or ``host_memory`` (bytes or a size string) for the plans
        to come; ``planned``: the packs are built (the trainer's next step plans afresh).

        Raises:
            ValueError: an unparseable or negative size, a new budget for pipeline stages
                already planned (they are planned once), or a ``device_memory`` the GPU cannot
                hold once this trainer's packs are released (naming what is free); the budget
                stays as it was.
        """
        parsed = parse_bytes(value, name)
        h = self.holdings
        if h.pipeline is not None and planned and parsed != getattr(self, name):
            raise ValueError(f"{name}={value!r} refused: with parallel='pipeline' the stages "
                             "are planned once, at the first step; make a new Trainer with "
                             f"{name}={value!r} and load() a checkpoint into it")
        if name == "device_memory" and h.device.type == "cuda" \
                and parsed != self.device_memory:  # as at construction
            check_fits(parsed, room_for_new_packs(h.device, h.tiers[Loc.DEVICE].used),
                       h.device)
        setattr(self, name, parsed)

    @property
    def k_ratio(self) -> float:
        """Optimizer-state bytes per parameter byte, as probed (before mixed precision's fp32
        masters: ``precision.k_ratio(k_ratio)``)."""
        return self._k_ratio

    # -- profiles --------------------------------------------------------------------------
    def profile(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, built: Built | None,
                layouts: list[Layout]) -> None:
        """Profile every layer on micro-batch ``(x, y)`` (and :attr:`second_input`, to check
        forward groups), one layer's weights in host memory at a time: before the packs are
        ``built``, a model on the meta device materializes each layer; after, a pack homed
        off the device binds its home weights to its layers."""
        h = self.holdings
        h.weights_arrived()
        grouping = self.forward_group != 1 and self.second_input is not None
        try:
            self.profiles = profile_layers(h.chain, layouts, x, y, self.loss_fn, h.device,
                                           h.precision, changed=self.changing,
                                           group_inputs=self.second_input if grouping
                                           else None, copies=h.copies,
                                           values=built.layer_values if built is not None
                                           else h.materializer.layer)
        finally:
            if built is not None:
                built.forget_gradients()  # the profile's backward set them

    # -- plans -----------------------------------------------------------------------------
    def request(self, sizes: list[int], fixed: tuple[Bounds, Placement] | None,
                forward_group: int | None, update_chunk: int | str | None) -> PlanRequest:
        """What a plan for micro-batches of ``sizes`` is asked: this trainer's profiles,
        schedule, budgets, optimizer-state ratio, link rates and constraints, with these
        pack bounds and placement (``fixed``), forward groups and update chunks."""
        h = self.holdings
        assert self.profiles is not None
        # Mixed precision: K holds the fp32 masters too, one more byte per (fp32) G byte; fp16
        # checks every gradient for overflow before any update, as clipping needs every one.
        k_ratio = h.precision.k_ratio(self._k_ratio)
        bandwidth, ranks, local_ranks = measured_bandwidth(h.device), 1, 1
        if h.dp is not None:  # all-reduce rate; ranks sharing this machine's links
            bandwidth, ranks, local_ranks = h.dp.planning(bandwidth)
        return PlanRequest(self.profiles, self.schedule_name, sizes, self.device_memory,
                           self.host_memory, k_ratio, bandwidth,
                           prefetch=self.prefetch, fixed=fixed, nvme=h.store is not None,
                           deferred_updates=self.config.clip_grad_norm is not None
                           or h.precision.scaling,
                           tied=self.tied, ranks=ranks, local_ranks=local_ranks,
                           shard=h.dp.group.rank if h.dp is not None and h.dp.shard
                           else None, forward_group=forward_group if len(sizes) > 1 else 1,
                           staging=h.device.type == "cuda", update_chunk=update_chunk,
                           overlap_updates=self.config.overlap_updates)

    def plan_for(self, sizes: list[int], fixed: tuple[Bounds, Placement] | None = None,
                 forward_group: int | str | None = "asked",
                 update_chunk: int | str | None = "given") -> Plan:
        """A plan for micro-batches of ``sizes``; ``fixed``: keep these pack bounds and
        placement; ``forward_group``: micro-batches per forward (default: as asked);
        ``update_chunk``: the packs' chunk budget (default: the one this trainer was given).
        A pipeline stage plans its own packs (:meth:`harmony.parallel.pipeline.Pipeline.plan`).

        Raises:
            InfeasiblePlan: nothing fits the budgets.
            ValueError: ``forward_micro_batch_size`` asks for groups no pack can make.
        """
        assert self.profiles is not None
        pipeline = self.holdings.pipeline
        group = self.forward_group if forward_group == "asked" else forward_group
        assert group is None or isinstance(group, int)
        chunk = self.update_chunk if update_chunk == "given" else update_chunk
        if pipeline is not None:  # this rank's stage (harmony.parallel.pipeline)
            return pipeline.plan(self.request(sizes, fixed, group, chunk))
        chosen = plan(self.request(sizes, fixed, group, chunk))
        wanted = self.config.forward_micro_batch_size
        if isinstance(wanted, int) and group and group > 1:
            refuse_ungroupable(wanted, len(chosen.bounds), chosen.ungrouped,
                               self.holdings.chain.names)
        return chosen

    def first(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
              profile: Profile) -> Plan:
        """The first plan: a ``profile`` on ``(x, y)``, then a plan keeping :attr:`fixed`."""
        profile(x, y)
        return self.plan_for(sizes, fixed=self.fixed)

    def agreed(self, chosen: Plan, sizes: list[int]) -> Plan:
        """With data parallelism, the plan every rank builds: rank 0's packs, so all-reduces
        pair up (collective); ``chosen`` itself in one process."""
        dp = self.holdings.dp
        if dp is None:
            return chosen
        agreed = dp.agree(chosen.bounds, chosen.placement, chosen.forward_group,
                          chosen.update_chunk)
        if agreed is not None:
            chosen = self.plan_for(sizes, fixed=agreed[:2], forward_group=agreed[2],
                                   update_chunk=agreed[3])
        self.forward_group = chosen.forward_group  # (later shapes keep rank 0's choice)
        return chosen

    def within(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
               key: ShapeKey, known: ShapeKey, current: Plan, profile: Profile) -> Plan:
        """A plan for a new batch shape ``key`` within the packs built for ``current`` (after a
        ``profile`` on ``(x, y)`` when its per-sample shapes differ from those of ``known``,
        a shape planned for these packs).

        Raises:
            InfeasiblePlan: these packs cannot hold the shape (the trainer then re-homes).
        """
        shapes = key[1:]
        unchecked = self.forward_group != 1 and self.second_input is not None and \
            self.profiles is not None and any(lp.no_group == UNCHECKED for lp in self.profiles)
        if shapes != known[1:] or unchecked:
            # new per-sample shapes: sizes per sample changed (or a first batch of one
            # micro-batch left forward groups unchecked)
            profile(x, y)
        fixed = (current.bounds, current.placement)
        # (the packs' files are split into the chunks they were built with)
        return self.plan_for(sizes, fixed=fixed, update_chunk=current.update_chunk)

    def fresh(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
              profile: Profile) -> Plan:
        """A new plan for these shapes, packs and placement chosen afresh (for a re-home),
        after a ``profile`` on ``(x, y)``; on failure the profiles stay those of the packs
        built."""
        profiles = self.profiles
        try:  # raises before anything changes if nothing fits
            profile(x, y)
            return self.plan_for(sizes)
        except BaseException:
            self.profiles = profiles  # (the packs stay those of the first shapes)
            raise

    def micro_batch_size(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                         targets: torch.Tensor, profile: Profile, first: bool) -> int:
        """micro_batch_size='auto': the largest size with a plan, per batch shape (after a
        ``profile`` on two samples of a new shape); on the ``first`` step, before the packs
        are built, its plan is kept as :attr:`auto_plan` for them."""
        xs, ys, _, _ = split_batch(inputs, targets, 2)  # (2: BatchNorm needs two samples)
        n = targets.shape[0]
        # (under the budgets: set between steps, they choose again)
        key = (self.device_memory, self.host_memory, n) + tuple(
            (tuple(t.shape[1:]), t.dtype) for t in xs[0])
        if key not in self._auto_sizes:
            self.second_input = xs[1] if len(xs) > 1 else None
            profile(xs[0], ys[0])  # sizes per sample; the plan scales them
            self._auto_sizes[key], chosen = largest_micro_batch(
                n, partial(self.plan_for, fixed=self.fixed))
            if first:  # the first step builds its packs from this plan
                self.auto_plan = chosen
        return self._auto_sizes[key]
