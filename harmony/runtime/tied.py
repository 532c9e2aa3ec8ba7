"""The runtime's side of tied weights (:mod:`harmony.model.tied`): :class:`TiedCopies`.

Before the owner's update (and before global-norm clipping, which counts the tied gradient
once) each sharer's gradient for its copy is added into the owner's; if the sharer's own update
comes first, that gradient is copied aside on the tier where the sharer's gradients live, and
charged there, until then. After the owner's update the new value is written into every
sharer's copy: at the sharer's home (device, host, or its NVMe file) and in a device copy of the
sharer's weights, if one is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from harmony.model.tied import TiedWeights, trainable_index
from harmony.runtime.gradients import Gradients
from harmony.runtime.homes import Home
from harmony.runtime.pack import Pack
from harmony.runtime.weights import DeviceWeights
from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.tier import Tier


def _typed(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The start of uint8 pool buffer ``buf`` viewed with ``like``'s dtype and shape."""
    n = like.numel() * like.element_size()
    return buf[:n].view(like.dtype).view(like.shape)


class TiedCopies:
    """Merges tied gradients into their owner's and refreshes the sharers' copies.

    Args:
        tied: the ties, found in the packs. packs: the packs. grads: their gradients.
        weights: their device copies. homes: the home of each location. tiers: the tier of
        each location. engine: the swap engine.

    Per step: :meth:`start`; before the first update, if clipping, :meth:`merge_all`; as
    each pack's update begins :meth:`before_update`, and once its new weights exist
    :meth:`after_update`; after a failure :meth:`abandon`.
    """

    def __init__(self, tied: TiedWeights, packs: Sequence[Pack], grads: Gradients,
                 weights: DeviceWeights, homes: Mapping[Loc, Home], tiers: dict[Loc, Tier],
                 engine: SwapEngine) -> None:
        self._tied, self._packs, self._grads, self._weights = tied, packs, grads, weights
        self._homes, self._tiers, self._engine = homes, tiers, engine
        self._placement: Placement | None = None  # the step's
        # (tie number, sharer pack) -> gradient copied aside, with the tier it is charged to
        self.held: dict[tuple[int, int], tuple[torch.Tensor, Loc]] = {}
        self.merged: set[int] = set()  # ties whose gradients are summed in the owner's

    def start(self, schedule: Schedule) -> None:
        """Begin a step: check the schedule, forget the last step's merges.

        Raises:
            ValueError: the schedule updates an owner before a sharer's last backward.
        """
        self._tied.check(schedule)
        self.merged.clear()
        self._placement = schedule.placement

    def _update_loc(self, p: int) -> Loc:
        assert self._placement is not None, "start() first"
        return self._placement.update_loc(p)

    # -- gradients ----------------------------------------------------------------------------
    def merge_all(self) -> None:
        """Sum every tie's gradients into its owner's (before clipping: the norm counts the
        tied gradient once); every gradient of the step exists here."""
        for n in range(len(self._tied.trained)):
            self._merge(n)

    def _merge(self, n: int) -> None:
        if n in self.merged:
            return
        tie, i, sharers = self._tied.trained[n]
        owner = self._packs[tie.owner]
        loc = self._update_loc(tie.owner)
        self._grads.views(tie.owner, loc)  # waits until they are where the update reads them
        target = owner.layout.trainable[i].view(self._grads.flat(tie.owner, loc))
        for s, j in sharers:
            held = self.held.pop((n, s), None)
            if held is not None:
                buf, at = held
                src: torch.Tensor | None = _typed(buf, target)
            else:
                src = self._grads.live(s, j)
            if src is not None:
                self._engine.host_write(target, f"the gradient of tied {tie.name} (merged)")
                target.add_(src.to(target.device))
                owner.got_grad[i] = True
            if held is not None:
                self._tiers[at].release(held[0])
        self.merged.add(n)

    def before_update(self, p: int) -> None:
        """Called as pack ``p``'s update begins (after clipping, if any)."""
        for n, (tie, _, sharers) in enumerate(self._tied.trained):
            if tie.owner == p:
                self._merge(n)
                continue
            if n in self.merged:
                continue
            for s, j in sharers:
                if s != p:
                    continue
                # The sharer's gradients go when its update is done; the owner's update is
                # still to come: keep this one aside, on the tier the gradients are on.
                src = self._grads.live(s, j)
                if src is None:
                    continue
                loc = self._update_loc(s)
                nbytes = src.numel() * src.element_size()
                buf = self._tiers[loc].allocate(nbytes,
                                                f"gradient of tied {tie.name} from pack {s}")
                _typed(buf, src).copy_(src)
                self.held[(n, s)] = (buf, loc)

    # -- weights ------------------------------------------------------------------------------
    def after_update(self, p: int, flat: torch.Tensor, base: int = 0,
                     params: range | None = None) -> None:
        """Pack ``p`` was updated and its new weights are ``flat``: refresh the copies. With
        ``params`` (trainable indices: one chunk of an NVMe pack's update), only the copies
        of those parameters, and ``flat`` holds the pack's weights from byte ``base`` on."""
        for tie in self._tied.ties:
            if tie.owner != p or not tie.master.requires_grad:
                continue
            owner = self._packs[p]
            if params is not None and trainable_index(owner, tie.master) not in params:
                continue
            src_entry = next(e for e in owner.layout.entries if e.tensor is tie.master)
            src = src_entry.view(flat, base)
            src_loc = self._homes[owner.home].stepped_at
            for sharer in tie.sharers:
                self._refresh(self._packs[sharer.pack], sharer.copy, src, src_loc)

    def _refresh(self, pack: Pack, copy: nn.Parameter, src: torch.Tensor, src_loc: Loc) -> None:
        entry = next(e for e in pack.layout.entries if e.tensor is copy)
        self._weights.write_entry(pack.index, entry, src, src_loc)
        self._homes[pack.home].write_entry(pack, entry, src, src_loc)

    def abandon(self) -> None:
        """A failed step: give the gradients held aside back to their tiers."""
        for buf, loc in self.held.values():
            self._tiers[loc].release(buf)
        self.held.clear()
        self.merged.clear()
