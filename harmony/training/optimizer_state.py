"""The optimizers' and learning-rate schedulers' state of a trainer's packs, under the model's
own keys.

A trainer builds one optimizer (and scheduler) per pack, so their state is keyed by the
model's ``state_dict()`` keys instead (``"<parameter key>/<state name>"``, e.g.
``"0.weight/exp_avg"``), whichever packs the plan makes: a checkpoint then loads across plans,
and a re-home hands the state over to new packs the same way, in memory. While no packs are
built (before the first step, or during a re-home) the state is held *pending* and applied to
the packs when they are built. A pack homed on NVMe keeps its optimizer state in files; it is
read into host memory while it is read or written here.

Example::

    state = OptimizerState(holdings, optimizer_factory)
    tensors, scalars, groups = state.read(built)     # every pack's, by parameter key
    state.pending = (tensors, scalars, groups)        # applied to the next packs built
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harmony.runtime.pack import NothingToTrain
from schedules.task import Loc

if TYPE_CHECKING:
    from harmony.runtime.pack import Pack
    from harmony.training.built import Built
    from harmony.training.holdings import Holdings
    from swap.nvme import NvmeStore

__all__ = ["OptimizerState", "OptimizerTensors", "state_in_memory"]

# (tensors by "<key>/<name>" (a dict, or a checkpoint's file read as they are looked up),
# other values by "<key>/<name>", each pack's param_groups less their parameters)
OptimizerTensors = tuple[Mapping[str, torch.Tensor], dict[str, Any], list[Any]]


class OptimizerState:
    """A trainer's optimizer and scheduler state, read from its packs, applied to them, and
    held while no packs hold it (see the module docstring).

    Args:
        holdings: the trainer's surroundings (model, store, process groups).
        optimizer_factory: the factory the packs' optimizers come from (its class is checked
            against a checkpoint's).

    Attributes:
        pending: optimizer state to apply to the next packs built (None: nothing).
        pending_scheduler: scheduler state to apply likewise; kept while no scheduler takes
            it (a checkpoint then saves it again).
        gathered_scheduler: with a sharded optimizer, the scheduler state last gathered from
            a rank that owns a pack.
    """

    def __init__(self, holdings: Holdings,
                 optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self.holdings = holdings
        self.optimizer_factory = optimizer_factory
        self.pending: OptimizerTensors | None = None
        self.pending_scheduler: dict[str, Any] | None = None
        self.gathered_scheduler: dict[str, Any] | None = None
        self._probed: str | None = None  # the optimizer's class, once probed

    def optimizer_name(self, built: Built | None) -> str:
        """The optimizer's class (``module.QualName``) the factory builds, from a built pack,
        else from a probe over a stand-in parameter; "" if it cannot be told."""
        for pack in built.packs if built is not None else []:
            if not isinstance(pack.optimizer, NothingToTrain):
                cls = type(pack.optimizer)
                return f"{cls.__module__}.{cls.__qualname__}"
        if self._probed is None:
            try:
                probe = self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
                cls = type(probe)
                self._probed = f"{cls.__module__}.{cls.__qualname__}"
            except Exception:  # a factory that cannot build over a stand-in: not checked
                self._probed = ""
        return self._probed

    # -- reading ---------------------------------------------------------------------------
    def read(self, built: Built | None) -> OptimizerTensors:
        """Every pack's optimizer state (copies), under the model's keys; before the packs
        are built, the state loaded or handed over for them (empty if none)."""
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        groups: list[Any] = []
        if built is None:
            if self.pending is not None:
                pending, scalars, groups = self.pending
                tensors = {k: v.clone() for k, v in pending.items()}
                return tensors, dict(scalars), list(groups)
            return tensors, scalars, groups
        for pack in built.packs:
            keys = self.holdings.param_keys(pack)
            order = [p for g in pack.optimizer.param_groups for p in g["params"]]
            with state_in_memory(pack, self.holdings.store, write_back=False):
                sd = pack.optimizer.state_dict()
                sd["state"] = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in s.items()} for i, s in sd["state"].items()}
            for idx, state in sd["state"].items():
                key = keys[id(order[idx])]
                for name, val in state.items():
                    if isinstance(val, torch.Tensor):
                        tensors[f"{key}/{name}"] = val
                    else:
                        scalars[f"{key}/{name}"] = val
            groups.append([{k: v for k, v in g.items() if k != "params"}
                           for g in sd["param_groups"]])
        return tensors, scalars, groups

    def gather(self, built: Built | None) -> OptimizerTensors:
        """Every pack's optimizer state, gathered from the ranks owning them (sharded
        optimizer; collective). The learning-rate scheduler's state comes from a rank that
        owns a pack, and is kept (:attr:`gathered_scheduler`) for the checkpoint."""
        dp = self.holdings.dp
        assert dp is not None
        tensors, scalars, groups = self.read(built)
        if built is None:
            return tensors, scalars, groups
        mine = {p: groups[p] for p in range(len(built.packs)) if built.runtime.owns(p)}
        scheduler = self.scheduler(built) if mine else None
        tensors, scalars, all_groups, scheduler = dp.gather_optimizer(
            tensors, scalars, mine, scheduler)
        self.gathered_scheduler = scheduler
        return tensors, scalars, all_groups

    def scheduler(self, built: Built | None) -> dict[str, Any] | None:
        """The learning-rate schedulers' state (the same for every pack) as JSON data; the
        pending state while no scheduler is built.

        Raises:
            ValueError: the state holds values JSON cannot store, naming the fix.
        """
        schedulers = built.lr_schedulers if built is not None else []
        if not schedulers:
            return self.pending_scheduler
        # (a scheduler of a pack this rank trains: a sharded optimizer's other packs have none)
        state = next((s for s in schedulers if s.optimizer.param_groups),
                     schedulers[0]).state_dict()
        try:
            json.dumps(state)
        except TypeError as err:
            raise ValueError(f"the learning-rate scheduler's state_dict() holds values JSON "
                             f"cannot store ({err}); use a scheduler whose state is plain "
                             "numbers (StepLR, LambdaLR, CosineAnnealingLR, ...)") from err
        return state

    # -- writing ---------------------------------------------------------------------------
    def apply(self, built: Built) -> None:
        """Apply the pending state to newly built packs (checking first that the schedulers'
        state can be saved: a ValueError now, not at the first save)."""
        if built.lr_schedulers:
            self.scheduler(built)
        self.apply_pending(built)

    def apply_pending(self, built: Built) -> None:
        """Apply the pending optimizer state, then the pending scheduler state (kept while
        no scheduler takes it), to ``built``'s packs."""
        self._apply_optimizer(built)
        self._apply_scheduler(built)

    def _apply_scheduler(self, built: Built) -> None:
        if self.pending_scheduler is None or not built.lr_schedulers:
            return
        for scheduler in built.lr_schedulers:
            scheduler.load_state_dict(dict(self.pending_scheduler))
        self.pending_scheduler = None

    def _apply_optimizer(self, built: Built) -> None:
        if self.pending is None:
            return
        tensors, scalars, groups = self.pending
        # parameter key -> its state's names ("key/exp_avg"); a tensor is read (from a
        # checkpoint's file, say) only as its pack takes it: one pack's state at a time
        names: dict[str, list[str]] = {}
        for name in list(tensors) + list(scalars):
            names.setdefault(name.rpartition("/")[0], []).append(name)
        # A pipeline rank's packs are the checkpoint's packs from its first one on.
        pipeline = self.holdings.pipeline
        offset = pipeline.first_pack if pipeline is not None else 0
        for i, pack in enumerate(built.packs, start=offset):
            keys = self.holdings.param_keys(pack)
            order = [p for g in pack.optimizer.param_groups for p in g["params"]]
            state: dict[int, dict[str, Any]] = {}
            for idx, param in enumerate(order):
                key = keys[id(param)]
                entry = {name[len(key) + 1:]: tensors[name] if name in tensors
                         else scalars[name] for name in names.get(key, [])}
                if entry:
                    state[idx] = entry
            sd = pack.optimizer.state_dict()
            saved = groups[i] if i < len(groups) and len(groups[i]) == len(sd["param_groups"]) \
                else (groups[0] if groups else [])
            new_groups = [{**s, "params": g["params"]}
                          for g, s in zip(sd["param_groups"], saved)] or sd["param_groups"]
            with state_in_memory(pack, self.holdings.store, write_back=bool(state)):
                pack.optimizer.load_state_dict({"state": state, "param_groups": new_groups})
            pack.settle_optimizer_bytes()
        self.pending = None


@contextlib.contextmanager
def state_in_memory(pack: Pack, store: NvmeStore | None, write_back: bool) -> Iterator[None]:
    """Bind an NVMe pack's masters and optimizer state to host copies for the body (and,
    with ``write_back``, write the state back to its files after it)."""
    if pack.home is not Loc.NVME or not pack.owned:
        yield
        return
    assert store is not None
    flat = pack.master_weights()
    pack.bind_masters(flat)
    chunks = range(len(pack.chunks))
    for c in chunks:  # (each chunk's state from its file)
        if pack.state_laid_out(c):
            k = torch.empty(pack.k_sizes[c], dtype=torch.uint8)
            store.read(pack.key("K", c), k).synchronize()
            pack.bind_state(c, k)
    try:
        yield
        if write_back:
            for c in chunks:
                pack.layout_state(c)
                if pack.k_layouts[c] is not None:
                    k = torch.empty(pack.k_sizes[c], dtype=torch.uint8)
                    pack.bind_state(c, k, copy_in=True)
                    store.write(pack.key("K", c), k).synchronize()
            pack.settle_optimizer_bytes()
    finally:
        pack.bind_masters(None)
        for c in chunks:
            if pack.k_layouts[c] is not None:
                pack.bind_state(c, None)
