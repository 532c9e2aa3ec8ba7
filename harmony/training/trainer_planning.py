"""How a :class:`harmony.Trainer` comes to its plans: it profiles the layers, plans, builds the
packs and the runtime on the first step, plans again for each new batch shape, and re-homes
the training state to new packs when the first ones cannot hold a shape.

A batch of a new shape is planned within the packs already built (their bounds and
placement), after a new profile if its per-sample shapes are new. Where no such plan fits the
budgets, :meth:`TrainerPlanning._rehome` plans afresh and hands the weights, optimizer and
scheduler state over to the new packs by their keys (:mod:`harmony.training.trainer_state`). With
``micro_batch_size="auto"`` the largest size with a plan is chosen per batch shape. Plans use
the host<->device copy rate measured once per device (:func:`_bandwidth`).
:class:`TrainerPlanning` is a base of :class:`harmony.Trainer`, which sets the attributes
declared here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harmony.model.inplace import InputCopies
from harmony.model.layout import Layout
from harmony.model.tied import Tie, TiedWeights, retie, untie
from harmony.planning.device_memory import ReservedPeak
from harmony.planning.groups import refuse_ungroupable
from harmony.planning.microbatch import split_batch
from harmony.planning.planner import InfeasiblePlan, Plan, largest_micro_batch, plan
from harmony.planning.profile import UNCHECKED, profile_layers
from harmony.planning.refusals import refuse_nvme_space
from harmony.runtime.host_memory import trim
from harmony.runtime.options import RuntimeOptions
from harmony.runtime.pack import Pack
from harmony.runtime.runtime import Runtime
from harmony.training.trainer_state import TrainerState
from harmony.training.user_checks import check_lr_scheduler
from schedules.task import Loc

if TYPE_CHECKING:
    from harmony.model.materialize import Materializer
    from swap.engine import SwapEngine
    from swap.stats import Stats
    from swap.tier import Tier


class TrainerPlanning(TrainerState):
    """The planning part of :class:`harmony.Trainer` (its base class)."""

    # Set by Trainer.__init__.
    loss_fn: Callable[..., torch.Tensor]
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None
    clip_grad_norm: float | None
    device_memory: int | None
    host_memory: int | None
    prefetch: int | None
    forward_micro_batch_size: int | str | None
    update_chunk: int | str | None
    overlap_updates: bool
    stats: Stats
    tiers: dict[Loc, Tier]
    _engine: SwapEngine
    _fixed: tuple[Any, ...] | None
    _forward_group: int | None
    _second_input: tuple[torch.Tensor, ...] | None
    _auto_sizes: dict[tuple[Any, ...], int]
    _auto_plan: Plan | None
    _changing: set[int]
    _params: list[nn.Parameter]
    _tied: list[tuple[tuple[int, ...], int]]
    _plans: dict[tuple[Any, ...], Plan]
    _profiles: list[Any] | None
    _k_ratio: float
    _reserved: ReservedPeak
    _origin_device: Callable[[Any], torch.device]
    _input_copies: InputCopies
    _materializer: Materializer

    # -- planning ---------------------------------------------------------------------------

    def _profile(self, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        self._weights_arrived()
        grouping = self._forward_group != 1 and self._second_input is not None
        try:
            self._profiles = profile_layers(self.chain, self._layer_layouts, x, y,
                                            self.loss_fn, self.device, self.precision,
                                            changed=self._changing,
                                            group_inputs=self._second_input if grouping
                                            else None, copies=self._input_copies,
                                            values=self._layer_values)
        finally:
            for pack in self._runtime.packs if self._runtime is not None else []:
                pack.got_grad = [False] * len(pack.got_grad)  # the profile's backward set them

    @contextlib.contextmanager
    def _layer_values(self, i: int) -> Iterator[None]:
        """Layer ``i``'s weights while the profile runs it, one layer's at a time in host
        memory: before the packs are built, a model on the meta device materializes it;
        between steps, a pack homed off the device binds its home weights (read from NVMe
        when they live there) to its layers, which otherwise hold empty tensors."""
        if self._runtime is None:
            with self._materializer.layer(i):
                yield
            return
        pack = next((p for p in self._runtime.packs
                     if p.first_layer <= i < p.first_layer + len(p.layers)), None)
        if pack is None or pack.home is Loc.DEVICE:  # (another pipeline stage's layer)
            yield
            return
        pack.layout.bind(pack.home_weights())
        try:
            yield
        finally:
            pack.layout.bind(None)

    def _plan_for(self, sizes: list[int], fixed: Any = None,
                  forward_group: int | str | None = "asked",
                  update_chunk: int | str | None = "given") -> Plan:
        """A plan for micro-batches of ``sizes``; ``fixed``: keep these pack bounds and
        placement; ``forward_group``: micro-batches per forward (default: as asked);
        ``update_chunk``: the packs' chunk budget (default: the one this trainer was given)."""
        assert self._profiles is not None
        if self._pipeline is not None:  # this rank's stage (harmony.parallel.pipeline)
            return self._pipeline.plan(self, sizes)
        group = self._forward_group if forward_group == "asked" else forward_group
        assert group is None or isinstance(group, int)
        # Mixed precision: K holds the fp32 masters too, one more byte per (fp32) G byte; fp16
        # checks every gradient for overflow before any update, as clipping needs every one.
        k_ratio = self.precision.k_ratio(self._k_ratio)
        bandwidth, ranks, local_ranks = _bandwidth(self.device), 1, 1
        if self._dp is not None:  # all-reduce rate; ranks sharing this machine's links
            bandwidth, ranks, local_ranks = self._dp.planning(bandwidth)
        chosen = plan(self._profiles, self.schedule_name, sizes, self.device_memory,
                      self.host_memory, k_ratio, bandwidth,
                      prefetch=self.prefetch, fixed=fixed, nvme=self.store is not None,
                      deferred_updates=self.clip_grad_norm is not None
                      or self.precision.scaling,
                      tied=self._tied, ranks=ranks, local_ranks=local_ranks,
                      shard=self._dp.group.rank if self._dp is not None and self._dp.shard
                      else None, forward_group=group if len(sizes) > 1 else 1,
                      staging=self.device.type == "cuda",
                      update_chunk=self.update_chunk if update_chunk == "given"
                      else update_chunk, overlap_updates=self.overlap_updates)
        if isinstance(self.forward_micro_batch_size, int) and group and group > 1:
            refuse_ungroupable(self.forward_micro_batch_size, len(chosen.bounds),
                               chosen.ungrouped, self.chain.names)
        return chosen

    def _first_plan(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                    key: tuple[Any, ...], chosen: Plan | None = None) -> None:
        """Profile, plan (unless ``chosen`` is given) and build the packs and the runtime."""
        if chosen is None:
            self._profile(x, y)
            chosen = self._plan_for(sizes, fixed=self._fixed)
        if self._dp is not None:  # every rank runs rank 0's packs, so all-reduces pair up
            agreed = self._dp.agree(chosen.bounds, chosen.placement, chosen.forward_group,
                                    chosen.update_chunk)
            if agreed is not None:
                chosen = self._plan_for(sizes, fixed=agreed[:2], forward_group=agreed[2],
                                        update_chunk=agreed[3])
            self._forward_group = chosen.forward_group  # (later shapes keep rank 0's choice)
        if self._reserved.base is None:  # the profile's and the probe's blocks are freed now
            self._reserved.start()
        if self.store is not None:  # the disk must hold what the plan puts there
            refuse_nvme_space(chosen, self.store.root, held=self.store.used_bytes)
        # Building is all or nothing: on any failure (a raising or wrong optimizer or
        # scheduler factory, a disk filling up) every pack built so far gives its layers their
        # values back and its bytes back to the tiers, so the model holds what it held before
        # and the next step (or close()) starts afresh.
        packs: list[Pack] = []
        before = (self._layer_layouts, self._pending_optimizer, self._pending_scheduler)
        try:
            self._build(chosen, key, packs)
        except BaseException as err:
            lost = self._unbuild(packs, key, *before)
            if lost:
                err.add_note(lost)
            raise
        # The packs hold the values now: a re-plan takes the trained ones, not init= or the
        # weights= files (a failed build above gives the next try the same values again).
        self._materializer.done()

    def _build(self, chosen: Plan, key: tuple[Any, ...], packs: list[Pack]) -> None:
        """Build ``chosen``'s packs (appended to ``packs`` as they are) and the runtime."""
        placement = chosen.placement
        # Tied weights: packs after the first that uses one get a copy (harmony/model/tied.py).
        # (None with pipeline stages, whose bounds cover only this rank's layers)
        self._ties = untie(self.chain.model, self.chain.layers, chosen.bounds) \
            if self._tied else []
        if self._ties:
            self._layer_layouts = [Layout([m], self.precision.dtype_of)
                                   for m in self.chain.layers]
        rank = self._dp.group.rank if self._dp is not None else 0
        values = self._materializer.active
        for tie in self._ties if values else []:  # a copy takes its master's value
            for sharer in tie.sharers:
                self._materializer.alias(sharer.copy, partial(_master_value, packs, tie))
        for p, (a, b) in enumerate(chosen.bounds):
            home = placement.w[p]
            # Sharded optimizer: another rank may own this pack's optimizer state and masters
            # (and their charge: the plan's K for it is 0 here); this rank receives its W.
            packs.append(Pack.build(p, a, self.chain.layers[a:b], home, self.tiers[home],
                                    self.optimizer_factory, chosen.sizes.k[p], self.store,
                                    self.precision,
                                    untrained=TiedWeights.untrained(self._ties, p),
                                    owned=chosen.owners is None or chosen.owners[p] == rank,
                                    update_chunk=chosen.update_chunk,
                                    k_ratio=self.precision.k_ratio(self._k_ratio),
                                    values=partial(self._materializer.pack_values,
                                                   self.chain.layers[a:b], a) if values
                                    else None, staging=self.tiers[Loc.HOST]))
        trim()  # what building freed (the model's own weights, staging) goes back
        clip = None
        if self.clip_grad_norm is not None:
            # The norm is taken over the gradients in the model's parameter order, as
            # clip_grad_norm_(model.parameters()) does, so the sum is rounded the same way.
            where = {id(e.tensor): (p, i) for p, pack in enumerate(packs)
                     for i, e in enumerate(pack.layout.trainable)}
            clip = (self.clip_grad_norm, tuple(
                where[id(q)] for q in self._params if id(q) in where))
        options = RuntimeOptions(
            loss_fn=self.loss_fn, device=self.device, seed=self.seed, precision=self.precision,
            clip=clip, ties=TiedWeights(self._ties, packs) if self._ties else None,
            dp=self._dp, owners=chosen.owners,
            overlap_updates=bool(self.overlap_updates and chosen.overlap_updates),
            changing=self._changing)  # (the profile's set: grows if later shapes are profiled)
        if self._pipeline is not None:  # SEND/RECV with the neighbouring ranks
            options = self._pipeline.runtime_options(options)
        self._runtime = Runtime(packs, self.tiers, self._engine, options, self.store)
        self._plans[key] = chosen
        if self.lr_scheduler_factory is not None:
            # Built before a loaded state is applied: building one sets the learning rate to
            # the schedule's start, which the loaded optimizer settings must then override.
            self.lr_schedulers = [self.lr_scheduler_factory(p.optimizer) for p in packs]
            for scheduler in self.lr_schedulers:  # before any update: ValueError naming it
                check_lr_scheduler(scheduler, self.lr_scheduler_factory)
            self._scheduler_state()  # (a state JSON cannot hold: ValueError now, not at save)
        self._apply_optimizer_state()
        self._apply_scheduler_state()

    def _unbuild(self, packs: list[Pack], key: tuple[Any, ...], layouts: list[Layout],
                 pending_optimizer: Any, pending_scheduler: Any) -> str:
        """Undo a :meth:`_build` that failed: the layers get their values back (the same
        Parameter objects), the tiers and files theirs, the trainer its unbuilt state.
        Returns what could not be given back ("" when everything was)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        lost = []
        for pack in reversed(packs):
            try:
                pack.give_back(self._origin_device)
            except Exception as err:  # (its files unreadable, say): the others still are
                lost.append(f"pack {pack.index} ({type(err).__name__}: {err})")
        retie(self._ties)
        self._ties = []
        self._layer_layouts = layouts
        self._plans.pop(key, None)
        self.lr_schedulers = []
        self._pending_optimizer, self._pending_scheduler = pending_optimizer, pending_scheduler
        if not lost:
            return ""
        return (f"giving the layers of {', '.join(lost)} their weights back failed as well: "
                "those layers' values are lost; rebuild the model (or load it from a "
                "checkpoint) before training it")

    def _replan(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                key: tuple[Any, ...]) -> Plan:
        assert self._plan is not None
        shapes = key[1:]
        unchecked = self._forward_group != 1 and self._second_input is not None and \
            self._profiles is not None and any(lp.no_group == UNCHECKED for lp in self._profiles)
        if shapes != next(iter(self._plans))[1:] or unchecked:
            # new per-sample shapes: sizes per sample changed (or a first batch of one
            # micro-batch left forward groups unchecked)
            self._profile(x, y)
        fixed = (self._plan.bounds, self._plan.placement)
        try:  # (the packs' files are split into the chunks they were built with)
            chosen = self._plan_for(sizes, fixed=fixed, update_chunk=self._plan.update_chunk)
        except InfeasiblePlan:
            if self._pipeline is not None:  # (the stages are agreed between ranks once)
                raise
            # These shapes need more room than the packs built for the first ones leave
            # (say, longer sequences after packs were kept resident): plan afresh and move
            # the training state to the new packs' homes.
            return self._rehome(x, y, sizes, key)
        self._plans[key] = chosen
        return chosen

    def _rehome(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                key: tuple[Any, ...]) -> Plan:
        """Rebuild the packs from a fresh plan for these shapes, keeping weights, optimizer
        and scheduler state (the same keyed hand-over as save/load, in memory)."""
        assert self._runtime is not None
        weights = self.state_dict()
        optimizer_state = self._full_optimizer_state() if self._dp is not None \
            and self._dp.shard else self._optimizer_state()
        scheduler_state = self._gathered_scheduler if self._dp is not None \
            and self._dp.shard else self._scheduler_state()
        profiles = self._profiles
        try:  # raises before anything changes if nothing fits
            self._profile(x, y)
            chosen = self._plan_for(sizes)
        except BaseException:
            self._profiles = profiles  # (the packs stay those of the first shapes)
            raise
        # Buffers outside the state dict (non-persistent ones: rotary tables) keep their values.
        keys = {id(v) for v in self._model_tensors().values()}
        loose = []
        for pack in self._runtime.packs:
            mine = [e for e in pack.layout.buffers if id(e.tensor) not in keys]
            if mine:
                flat = pack.home_weights()
                loose += [(e.tensor, e.view(flat).clone()) for e in mine]
        for pack in self._runtime.packs:
            pack.release()
        for t, value in loose:
            t.data = value.to(t.device)
        self._runtime.close()
        self._runtime = None
        self._plans.clear()
        self.lr_schedulers = []
        retie(self._ties)  # the new packs split tied weights afresh
        self._ties = []
        with torch.no_grad():
            for k, v in self._model_tensors().items():
                v.data = weights[k].to(v.device)
        # (after the values are back: a layout takes each tensor's shape)
        self._layer_layouts = [Layout([m], self.precision.dtype_of) for m in self.chain.layers]
        self._pending_optimizer = optimizer_state
        self._pending_scheduler = scheduler_state
        self._fixed = None
        self._first_plan(x, y, sizes, key, chosen)
        return self._plans[key]

    def _auto_micro_batch_size(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                               targets: torch.Tensor) -> int:
        """micro_batch_size='auto': the largest size with a plan, per batch shape."""
        xs, ys, _, _ = split_batch(inputs, targets, 2)  # (2: BatchNorm needs two samples)
        n = targets.shape[0]
        key = (n,) + tuple((tuple(t.shape[1:]), t.dtype) for t in xs[0])
        if key not in self._auto_sizes:
            self._second_input = xs[1] if len(xs) > 1 else None
            self._profile(xs[0], ys[0])  # sizes per sample; the plan scales them
            self._auto_sizes[key], chosen = largest_micro_batch(
                n, partial(self._plan_for, fixed=self._fixed))
            if self._runtime is None:  # the first step builds its packs from this plan
                self._auto_plan = chosen
        return self._auto_sizes[key]


def _master_value(packs: list[Pack], tie: Tie) -> torch.Tensor:
    """The value of tied weight ``tie`` at its owner's home (the owner pack is built first)."""
    pack = packs[tie.owner]
    e = next(e for e in pack.layout.trainable if e.tensor is tie.master)
    return e.gview(pack.master_weights()).clone()


def _load_plan(path: str | os.PathLike[str]) -> Plan:
    from harmony.tools.report import plan_from_json  # the JSON format lives with the report

    try:
        data = json.loads(Path(path).read_text())
        return plan_from_json(data.get("plan", data))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"plan={str(path)!r} is not a plan written by harmony report --json "
                         f"({type(err).__name__}: {err})") from err


_BANDWIDTH: dict[str, dict[str, float]] = {}


def _bandwidth(device: torch.device) -> dict[str, float]:
    """Bytes/s of host<->device copies, measured once per device (64 MiB copies; freed
    at once, and covered by the fixed part of the bound on resident memory).

    On CUDA the host side is pinned as the host tier pins (:mod:`swap.pinned`, unpinned
    when the probe ends, never kept by PyTorch's caching host allocator), and the device
    block goes back to the caching allocator, which the trainer empties before it starts
    counting reserved bytes.
    """
    key = str(device)
    if key not in _BANDWIDTH:
        n = 64 << 20
        if device.type == "cuda":
            from swap.pinned import PinnedAllocator

            src = PinnedAllocator()(n)
        else:
            src = torch.empty(n, dtype=torch.uint8)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        src.copy_(dst)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bw = 2 * n / max(time.perf_counter() - t0, 1e-9)
        _BANDWIDTH[key] = {"host->device": bw, "device->host": bw}
    return _BANDWIDTH[key]
