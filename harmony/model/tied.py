"""Tied weights: one parameter used by layers of different packs (an embedding and an LM head).

Every pack moves, updates and stores its own flat buffer, so a parameter used by two packs is
split at build time (:func:`untie`) into

* the **master**: the model's own parameter, kept by the *owner*, the lowest-index pack using
  it. Its backward runs last in every generated schedule (packs go backward in reverse order),
  so its update can wait for every use's gradient;
* one **compute copy** per other pack using it (a *sharer*): a parameter of the same value in
  the sharer's flat weights, with its own slot in the sharer's gradients, that the sharer's
  optimizer never steps.

During a step the runtime (:class:`harmony.runtime.tied.TiedCopies`), before the owner's
update (and before global-norm clipping, which must count the tied gradient once, as
``clip_grad_norm_`` does on the plain model) adds each sharer's gradient for the copy into the
owner's gradient; if the sharer's own update comes first, that gradient is copied aside on the
tier where the sharer's gradients live, and charged there, until then. After the owner's update
the new value is written into every sharer's copy at the sharer's home (device, host, or its
NVMe file) and into a device copy of the sharer's weights, if one is loaded.

The gradient of the tied tensor is thus ``sum(owner's micro-batches) + sum(sharer's
micro-batches)`` instead of plain autograd's micro-batch by micro-batch interleaving: the same
terms, added in another order (a few ulps apart). Every other gradient is computed as before.

:class:`TiedWeights` finds each tie in the built packs and refuses a schedule that runs an
owner's update before a sharer's last backward (:meth:`TiedWeights.check`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from harmony.model.layout import Layout
from schedules.schedule import Schedule
from schedules.task import Op

__all__ = ["HasLayout", "Sharer", "Tie", "TiedWeights", "alias", "retie", "shared_parameters",
           "trainable_index", "untie"]


@dataclass
class Sharer:
    """A pack that uses a tied parameter through a compute copy."""

    pack: int
    copy: nn.Parameter
    uses: list[tuple[nn.Module, str]]  # module attributes that held the master before untie


@dataclass
class Tie:
    """One parameter used by layers of several packs: its master and the sharers' copies."""

    name: str  # the model's state_dict key of the master (for messages)
    master: nn.Parameter
    owner: int
    sharers: list[Sharer] = field(default_factory=list)


def alias(module: nn.Module) -> nn.Module:
    """A new module object computing as ``module`` with the same parameter and buffer objects.

    Its submodules are aliases too (a submodule shared inside ``module`` stays shared), so
    pointing one of its parameter attributes elsewhere (as ``harmony.model.tied.untie`` does for a
    pack's copy of a tied weight) leaves ``module`` unchanged.

    >>> lin = nn.Linear(2, 2)
    >>> twin = alias(lin)
    >>> twin is lin, twin.weight is lin.weight
    (False, True)
    """
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            new = copy.copy(m)
            memo[id(m)] = new
            new._parameters = dict(m._parameters)
            new._buffers = dict(m._buffers)
            new._modules = {k: None if v is None else clone(v) for k, v in m._modules.items()}
        return memo[id(m)]

    return clone(module)


def shared_parameters(layouts: Sequence[Layout], names: Sequence[str]) -> dict[int, list[int]]:
    """Tensor id -> the layers (ascending) using it, for parameters used by several layers.

    Raises:
        ValueError: a buffer used by several layers (buffers may change in forward, e.g.
            running statistics, so copies of one would drift apart).
    """
    users: dict[int, list[int]] = {}
    for i, layout in enumerate(layouts):
        for e in layout.entries:
            users.setdefault(id(e.tensor), []).append(i)
            if len(users[id(e.tensor)]) > 1 and not isinstance(e.tensor, nn.Parameter):
                j = users[id(e.tensor)][0]
                raise ValueError(
                    f"buffer {e.name!r} of layer {i} ({names[i]}) is shared with layer {j} "
                    f"({names[j]}); buffers shared across layers are not supported: give each "
                    "layer its own buffer or put both users in one layer")
    return {k: v for k, v in users.items() if len(v) > 1}


def untie(model: nn.Module, layers: Sequence[nn.Module],
          bounds: Sequence[tuple[int, int]]) -> list[Tie]:
    """Give every pack but the owner its own copy of each parameter shared across packs.

    ``bounds`` are the packs' (first, end) layer ranges. The owner's modules keep the model's
    parameter; in every other pack, each module attribute holding it is pointed at that pack's
    copy (one per pack, same value and ``requires_grad``). :func:`retie` undoes this.
    """
    pack_of = [p for p, (a, b) in enumerate(bounds) for _ in range(a, b)]
    key_of = {id(v): k for k, v in reversed(list(model.state_dict(keep_vars=True).items()))}
    used: dict[int, tuple[nn.Parameter, dict[int, list[tuple[nn.Module, str]]]]] = {}
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            for name, t in mod.named_parameters(recurse=False):
                entry = used.setdefault(id(t), (t, {}))
                uses = entry[1].setdefault(pack_of[i], [])
                if (mod, name) not in uses:
                    uses.append((mod, name))
    ties = []
    for master, by_pack in used.values():
        if len(by_pack) < 2:
            continue
        owner, *others = sorted(by_pack)
        tie = Tie(key_of.get(id(master), "?"), master, owner)
        for p in others:
            copy = nn.Parameter(master.detach().clone(), requires_grad=master.requires_grad)
            for mod, name in by_pack[p]:
                setattr(mod, name, copy)
            tie.sharers.append(Sharer(p, copy, by_pack[p]))
        ties.append(tie)
    return ties


def retie(ties: Sequence[Tie]) -> None:
    """Point the sharers' module attributes back at the masters (undoes :func:`untie`)."""
    for tie in ties:
        for sharer in tie.sharers:
            for mod, name in sharer.uses:
                setattr(mod, name, tie.master)


class HasLayout(Protocol):
    """A pack as :class:`TiedWeights` sees it: its flat layout."""

    @property
    def layout(self) -> Layout: ...


def trainable_index(pack: HasLayout, tensor: torch.Tensor) -> int:
    """The index of ``tensor`` among ``pack``'s trainable layout entries."""
    return next(i for i, e in enumerate(pack.layout.trainable) if e.tensor is tensor)


class TiedWeights:
    """The ties of a model split into packs, found in the packs' layouts, and the check of a
    schedule against them (the runtime's side, during a step, is
    :class:`harmony.runtime.tied.TiedCopies`).

    Args:
        ties: what :func:`untie` returned. packs: the built packs (sharers' optimizers must
            not hold the copies: see ``Pack.build(untrained=...)``).

    Example::

        ties = untie(model, layers, bounds)
        tied = TiedWeights(ties, packs)
        tied.check(schedule)   # ValueError if an owner's update comes too early
    """

    def __init__(self, ties: Sequence[Tie], packs: Sequence[HasLayout]) -> None:
        self.ties = list(ties)
        # (tie, owner's trainable index, [(sharer pack, copy's trainable index)]) for trainable
        self.trained = [(t, trainable_index(packs[t.owner], t.master),
                         [(s.pack, trainable_index(packs[s.pack], s.copy)) for s in t.sharers])
                        for t in self.ties if t.master.requires_grad]
        self.checked: set[int] = set()

    @staticmethod
    def untrained(ties: Sequence[Tie], pack: int) -> frozenset[int]:
        """Ids of the copies pack ``pack`` holds: its optimizer must leave them alone."""
        return frozenset(id(s.copy) for t in ties for s in t.sharers if s.pack == pack)

    def check(self, schedule: Schedule) -> None:
        """Refuse a schedule that updates an owner before a sharer's last backward.

        Raises:
            ValueError: naming the parameter, the packs and the offending tasks.
        """
        if id(schedule) in self.checked:
            return
        tasks = schedule.compute_tasks()
        last_bwd: dict[int, int] = {}
        upd: dict[int, int] = {}
        for i, task in enumerate(tasks):
            if task.op is Op.BWD:
                last_bwd[task.pack] = i
            elif task.op is Op.UPD:
                upd.setdefault(task.pack, i)
        for tie, _, sharers in self.trained:
            for s, _ in sharers:
                if upd.get(tie.owner, -1) < last_bwd.get(s, 0):
                    raise ValueError(
                        f"schedule {schedule.name!r} runs the update of pack {tie.owner}, which "
                        f"owns the tied parameter {tie.name!r}, before the last backward of "
                        f"pack {s}, which also uses it (task {upd.get(tie.owner)} vs "
                        f"{last_bwd.get(s)}); the owner's update must wait for every use's "
                        "gradient: use a schedule that updates packs after their backward "
                        "in reverse order ('harmony', 'per-microbatch', 'resident')")
        self.checked.add(id(schedule))
