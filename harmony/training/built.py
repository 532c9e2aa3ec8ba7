"""What lives under a trainer's current plan: the packs, the runtime that runs them, the tied
weights split across them, and the learning-rate schedulers of their optimizers.

A trainer builds one :class:`Built` from its first plan, on its first step. Later batch shapes
are planned within its packs (their plans are kept in :attr:`Built.plans`); where none fits,
the trainer re-homes: it reads the training state out, releases this one and builds a new one
from a fresh plan. Building is all or nothing: on any failure (a raising or wrong optimizer
or scheduler factory, a disk filling up) every pack built so far gives its layers their
values back and its bytes back to the tiers, so the model holds what it held before.

Example::

    built = Built.build(chosen, key, holdings, setup, state_io.optimizer.apply)
    built.runtime.run(...)            # a step
    built.give_back(origin_device)    # at close: the model gets the trained weights
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harmony.model.layout import Layout
from harmony.model.tied import Tie, TiedWeights, retie, untie
from harmony.runtime.host_memory import trim
from harmony.runtime.options import RuntimeOptions
from harmony.runtime.pack import Pack
from harmony.runtime.runtime import Runtime
from harmony.training.user_checks import check_lr_scheduler
from schedules.task import Loc

if TYPE_CHECKING:
    from harmony.planning.plan import Plan
    from harmony.training.config import TrainerConfig
    from harmony.training.holdings import Holdings

__all__ = ["BuildSetup", "Built", "ShapeKey"]

# A batch's shape as plans are kept by: the micro-batch sizes, then per input tensor its
# per-sample shape and dtype.
ShapeKey = tuple[Any, ...]


@dataclass(frozen=True)
class BuildSetup:
    """What building packs takes besides the plan and the trainer's holdings.

    Attributes:
        config: the trainer's settings (seed, overlap_updates, clip_grad_norm, lr_scheduler).
        loss_fn: the loss of one micro-batch.
        optimizer_factory: the checked factory, called once per pack.
        layouts: the layers' layouts while the model is whole (untied).
        k_ratio: optimizer-state bytes per parameter byte, as probed (before precision).
        tied: whether some parameter is used by several layers.
        params: the model's parameters in its own order, each tied one once (the order in
            which ``clip_grad_norm_`` sums the gradients' norms).
        changing: buffers a forward changes; the runtime keeps this set, which grows if later
            shapes are profiled.
        origin_device: the device a layout entry's tensor came from (where a build that
            fails gives its value back).
    """

    config: TrainerConfig
    loss_fn: Callable[..., torch.Tensor]
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    layouts: list[Layout]
    k_ratio: float
    tied: bool
    params: list[nn.Parameter]
    changing: set[int]
    origin_device: Callable[[Any], torch.device]


class Built:
    """The packs, runtime, ties and schedulers of one plan, and the plans made within them.

    Attributes:
        runtime: runs the plans' schedules over the packs (``runtime.packs``).
        ties: tied weights whose users fall in several packs (copies in the later packs).
        layouts: the layers' layouts these packs were built from (after the ties were split).
        lr_schedulers: one per pack's optimizer (empty without ``lr_scheduler``).
        plans: the plan of every batch shape seen, all within these packs.
        owners: with a sharded optimizer, the rank owning each pack's optimizer state and
            masters (None: this rank owns every pack).
    """

    def __init__(self, runtime: Runtime, ties: list[Tie], layouts: list[Layout],
                 lr_schedulers: list[Any], plans: dict[ShapeKey, Plan],
                 owners: tuple[int, ...] | None = None) -> None:
        self.runtime = runtime
        self.ties = ties
        self.layouts = layouts
        self.lr_schedulers = lr_schedulers
        self.plans = plans
        self.owners = owners

    @property
    def packs(self) -> list[Pack]:
        return self.runtime.packs

    @classmethod
    def build(cls, chosen: Plan, key: ShapeKey, holdings: Holdings, setup: BuildSetup,
              apply: Callable[[Built], None]) -> Built:
        """Build ``chosen``'s packs and the runtime, then ``apply`` the pending training state
        (optimizer and scheduler state loaded or handed over) to them.

        Raises:
            whatever building raised, after everything built so far gave back what it held;
            a note on the error names layers whose values could not be given back.
        """
        packs: list[Pack] = []
        ties: list[Tie] = []
        runtime: Runtime | None = None
        try:
            # Tied weights: packs after the first that uses one get a copy (model/tied.py).
            # A pipeline rank's packs cover its own layers only: it unties among those (the
            # ties it can have are frozen ones; trainable ties are refused at setup).
            first, end = chosen.bounds[0][0], chosen.bounds[-1][1]
            ties = untie(holdings.chain.model, holdings.chain.layers[first:end],
                         chosen.bounds) if setup.tied else []
            layouts = [Layout([m], holdings.precision.dtype_of) for m in holdings.chain.layers] \
                if ties else setup.layouts
            _build_packs(chosen, holdings, setup, ties, packs)
            trim()  # what building freed (the model's own weights, staging) goes back
            runtime = _runtime(chosen, holdings, setup, ties, packs)
            built = cls(runtime, ties, layouts, [], {key: chosen}, chosen.owners)
            factory = setup.config.lr_scheduler
            if factory is not None:
                # Built before a loaded state is applied: building one sets the learning rate
                # to the schedule's start, which the loaded optimizer settings must then
                # override.
                built.lr_schedulers = [factory(p.optimizer) for p in packs]
                for scheduler in built.lr_schedulers:  # before any update: ValueError naming it
                    check_lr_scheduler(scheduler, factory)
            apply(built)
            return built
        except BaseException as err:
            lost = _unbuild(runtime, packs, ties, setup.origin_device)
            if lost:
                err.add_note(lost)
            raise

    # -- between steps ---------------------------------------------------------------------
    @contextlib.contextmanager
    def layer_values(self, i: int) -> Iterator[None]:
        """Layer ``i``'s weights bound to it while the body runs it (a profile), one layer's at
        a time in host memory: a pack homed off the device binds its home weights (read from
        NVMe when they live there) to its layers, which otherwise hold empty tensors."""
        pack = next((p for p in self.packs
                     if p.first_layer <= i < p.first_layer + len(p.layers)), None)
        if pack is None or pack.home is Loc.DEVICE:  # (another pipeline stage's layer)
            yield
            return
        pack.layout.bind(pack.home_weights())
        try:
            yield
        finally:
            pack.layout.bind(None)

    def forget_gradients(self) -> None:
        """A profile's backward marked the packs' gradients as set: unmark them."""
        for pack in self.packs:
            pack.got_grad = [False] * len(pack.got_grad)

    def release(self, keys: set[int]) -> None:
        """Let go of the packs for a re-home: their bytes go back to the tiers, their layers
        keep what they hold, buffers outside the state dict (ids not in ``keys``:
        non-persistent ones, rotary tables) keep their values, and the model's modules share
        their tied parameters again (the new packs split them afresh)."""
        loose = []
        for pack in self.packs:
            mine = [e for e in pack.layout.buffers if id(e.tensor) not in keys]
            if mine:
                flat = pack.home_weights()
                loose += [(e.tensor, e.view(flat).clone()) for e in mine]
        for pack in self.packs:
            pack.release()
        for t, value in loose:
            t.data = value.to(t.device)
        self.runtime.close()
        self.lr_schedulers = []
        retie(self.ties)
        self.ties = []

    def give_back(self, origin_device: Callable[[Any], torch.device],
                  why_not: str | None) -> str | None:
        """Close the runtime and the packs; unless ``why_not`` says why they may not, give the
        model's layers the trained values on the devices they came from. Returns why the
        model was not given its weights (None: it was)."""
        self.runtime.close()
        for pack in self.packs:
            if why_not is None:
                try:
                    pack.give_back(origin_device)
                    continue
                except Exception as err:  # (an NVMe read failed, say)
                    why_not = (f"giving the weights back failed ({type(err).__name__}: "
                               f"{err}), so the model was not given back its weights; "
                               "save() or export() before close()")
            pack.close()
        retie(self.ties)  # the model's modules share their parameters again
        return why_not


def _build_packs(chosen: Plan, holdings: Holdings, setup: BuildSetup, ties: list[Tie],
                 packs: list[Pack]) -> None:
    """Build ``chosen``'s packs, appending each to ``packs`` as it is built."""
    chain, materializer, precision = holdings.chain, holdings.materializer, holdings.precision
    placement = chosen.placement
    rank = holdings.dp.group.rank if holdings.dp is not None else 0
    values = materializer.active
    for tie in ties if values else []:  # a copy takes its master's value
        for sharer in tie.sharers:
            materializer.alias(sharer.copy, partial(_master_value, packs, tie))
    for p, (a, b) in enumerate(chosen.bounds):
        home = placement.w[p]
        # Sharded optimizer: another rank may own this pack's optimizer state and masters
        # (and their charge: the plan's K for it is 0 here); this rank receives its W.
        packs.append(Pack.build(p, a, chain.layers[a:b], home, holdings.tiers[home],
                                setup.optimizer_factory, chosen.sizes.k[p], holdings.store,
                                precision,
                                untrained=TiedWeights.untrained(ties, p),
                                owned=chosen.owners is None or chosen.owners[p] == rank,
                                update_chunk=chosen.update_chunk,
                                k_ratio=precision.k_ratio(setup.k_ratio),
                                values=partial(materializer.pack_values,
                                               chain.layers[a:b], a) if values
                                else None, staging=holdings.tiers[Loc.HOST]))


def _runtime(chosen: Plan, holdings: Holdings, setup: BuildSetup, ties: list[Tie],
             packs: list[Pack]) -> Runtime:
    """The runtime of ``packs`` under ``chosen``."""
    config = setup.config
    clip = None
    if config.clip_grad_norm is not None:
        # The norm is taken over the gradients in the model's parameter order, as
        # clip_grad_norm_(model.parameters()) does, so the sum is rounded the same way.
        where = {id(e.tensor): (p, i) for p, pack in enumerate(packs)
                 for i, e in enumerate(pack.layout.trainable)}
        clip = (config.clip_grad_norm, tuple(
            where[id(q)] for q in setup.params if id(q) in where))
    options = RuntimeOptions(
        loss_fn=setup.loss_fn, device=holdings.device, seed=config.seed,
        precision=holdings.precision, clip=clip,
        ties=TiedWeights(ties, packs) if ties else None, dp=holdings.dp, owners=chosen.owners,
        overlap_updates=bool(config.overlap_updates and chosen.overlap_updates),
        changing=setup.changing)  # (the profile's set: grows if later shapes are profiled)
    if holdings.pipeline is not None:  # SEND/RECV with the neighbouring ranks
        options = holdings.pipeline.runtime_options(options)
    runtime = Runtime(packs, holdings.tiers, holdings.engine, options, holdings.store)
    return runtime


def _unbuild(runtime: Runtime | None, packs: list[Pack], ties: list[Tie],
             origin_device: Callable[[Any], torch.device]) -> str:
    """Undo a build that failed: the layers get their values back (the same Parameter
    objects), the tiers and files theirs. Returns what could not be given back ("" when
    everything was)."""
    if runtime is not None:
        runtime.close()
    lost = []
    for pack in reversed(packs):
        try:
            pack.give_back(origin_device)
        except Exception as err:  # (its files unreadable, say): the others still are
            lost.append(f"pack {pack.index} ({type(err).__name__}: {err})")
    retie(ties)
    if not lost:
        return ""
    return (f"giving the layers of {', '.join(lost)} their weights back failed as well: "
            "those layers' values are lost; rebuild the model (or load it from a "
            "checkpoint) before training it")


def _master_value(packs: list[Pack], tie: Tie) -> torch.Tensor:
    """The value of tied weight ``tie`` at its owner's home (the owner pack is built first)."""
    pack = packs[tie.owner]
    e = next(e for e in pack.layout.trainable if e.tensor is tie.master)
    return e.gview(pack.master_weights()).clone()
