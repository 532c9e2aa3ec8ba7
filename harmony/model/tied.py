"""Tied weights: one parameter used by layers of different packs (an embedding and an LM head).

Every pack moves, updates and stores its own flat buffer, so a parameter used by two packs is
split at build time (:func:`untie`) into

* the **master**: the model's own parameter, kept by the *owner*, the lowest-index pack using
  it. Its backward runs last in every generated schedule (packs go backward in reverse order),
  so its update can wait for every use's gradient;
* one **compute copy** per other pack using it (a *sharer*): a parameter of the same value in
  the sharer's flat weights, with its own slot in the sharer's gradients, that the sharer's
  optimizer never steps.

During a step (:class:`TiedWeights`, called by the runtime), before the owner's update (and
before global-norm clipping, which must count the tied gradient once, as ``clip_grad_norm_``
does on the plain model) each sharer's gradient for the copy is added into the owner's
gradient; if the sharer's own update comes first, that gradient is copied aside on the tier
where the sharer's gradients live, and charged there, until then. After the owner's update the
new value is written into every sharer's copy at the sharer's home (device, host, or its NVMe
file) and into a device copy of the sharer's weights, if one is loaded.

The gradient of the tied tensor is thus ``sum(owner's micro-batches) + sum(sharer's
micro-batches)`` instead of plain autograd's micro-batch by micro-batch interleaving: the same
terms, added in another order (a few ulps apart). Every other gradient is computed as before.

:meth:`TiedWeights.check` refuses a schedule that runs an owner's update before a sharer's last
backward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from harmony.model.layout import Layout
from schedules.schedule import Schedule
from schedules.simulate import link
from schedules.task import Kind, Loc, Op, Ref

if TYPE_CHECKING:  # the runtime imports this module
    from harmony.runtime.pack import Pack
    from harmony.runtime.runtime import Runtime

__all__ = ["Sharer", "Tie", "TiedWeights", "alias", "retie", "shared_parameters", "untie"]


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


def _typed(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The start of uint8 pool buffer ``buf`` viewed with ``like``'s dtype and shape."""
    n = like.numel() * like.element_size()
    return buf[:n].view(like.dtype).view(like.shape)


def _index(pack: Pack, tensor: torch.Tensor) -> int:
    return next(i for i, e in enumerate(pack.layout.trainable) if e.tensor is tensor)


class TiedWeights:
    """The runtime's side of tied weights: merging gradients and refreshing copies.

    Args:
        ties: what :func:`untie` returned. packs: the built packs (sharers' optimizers must
            not hold the copies: see ``Pack.build(untrained=...)``).
    """

    def __init__(self, ties: Sequence[Tie], packs: Sequence[Pack]) -> None:
        self.ties = list(ties)
        # (tie, owner's trainable index, [(sharer pack, copy's trainable index)]) for trainable
        self.trained = [(t, _index(packs[t.owner], t.master),
                         [(s.pack, _index(packs[s.pack], s.copy)) for s in t.sharers])
                        for t in self.ties if t.master.requires_grad]
        self.checked: set[int] = set()
        # (tie number, sharer pack) -> gradient copied aside, with the tier it is charged to
        self.held: dict[tuple[int, int], tuple[torch.Tensor, Loc]] = {}
        self.merged: set[int] = set()  # ties whose gradients are summed in the owner's

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

    def start(self, schedule: Schedule) -> None:
        """Begin a step: check the schedule, forget the last step's merges."""
        self.check(schedule)
        self.merged.clear()

    # -- gradients ----------------------------------------------------------------------------
    @staticmethod
    def _live_grad(rt: Runtime, p: int, i: int) -> torch.Tensor | None:
        """Pack ``p``'s gradient ``i`` wherever it is now (None: it got none)."""
        pack = rt.packs[p]
        if not pack.got_grad[i]:
            return None
        ref = Ref(Kind.G, p)
        slot = rt.values[ref]
        rt._wait_allreduce(p)  # data parallelism: the sum over the ranks
        if slot.dev is not None and slot.dev[0] is not None:
            rt._wait_dev(slot, ref)
            flat = slot.dev[0]
        else:
            if slot.home_ready is not None:  # stored behind: the host must see the bytes
                rt.engine.synchronize(slot.home_ready,
                                      link(Loc.DEVICE, rt.placement.update_loc(p)))
                slot.home_ready = None
            assert slot.home is not None and slot.home[0] is not None, f"G{p} is nowhere"
            flat = slot.home[0]
        return pack.layout.trainable[i].view(flat)

    def merge_all(self, rt: Runtime) -> None:
        """Sum every tie's gradients into its owner's (before clipping: the norm counts the
        tied gradient once); every gradient of the step exists here."""
        for n in range(len(self.trained)):
            self._merge(rt, n)

    def _merge(self, rt: Runtime, n: int) -> None:
        if n in self.merged:
            return
        tie, i, sharers = self.trained[n]
        owner = rt.packs[tie.owner]
        rt._grad_views(tie.owner)  # waits until the owner's gradients are where it updates
        target = owner.layout.trainable[i].view(self._flat_of(rt, tie.owner))
        for s, j in sharers:
            held = self.held.pop((n, s), None)
            if held is not None:
                buf, loc = held
                src: torch.Tensor | None = _typed(buf, target)
            else:
                src = self._live_grad(rt, s, j)
            if src is not None:
                rt.engine.host_write(target, f"the gradient of tied {tie.name} (merged)")
                target.add_(src.to(target.device))
                owner.got_grad[i] = True
            if held is not None:
                rt.tiers[loc].release(held[0])
        self.merged.add(n)

    @staticmethod
    def _flat_of(rt: Runtime, p: int) -> torch.Tensor:
        """Pack ``p``'s flat gradients where its update reads them."""
        slot = rt.values[Ref(Kind.G, p)]
        flat = slot.dev[0] if rt.placement.update_loc(p) is Loc.DEVICE and slot.dev is not None \
            else slot.home[0] if slot.home is not None else None
        assert flat is not None, f"G{p} is not where its update runs"
        return flat

    def before_update(self, rt: Runtime, p: int) -> None:
        """Called as pack ``p``'s update begins (after clipping, if any)."""
        for n, (tie, _, sharers) in enumerate(self.trained):
            if tie.owner == p:
                self._merge(rt, n)
                continue
            if n in self.merged:
                continue
            for s, j in sharers:
                if s != p:
                    continue
                # The sharer's gradients go when its update is done; the owner's update is
                # still to come: keep this one aside, on the tier the gradients are on.
                src = self._live_grad(rt, s, j)
                if src is None:
                    continue
                loc = rt.placement.update_loc(s)
                nbytes = src.numel() * src.element_size()
                buf = rt.tiers[loc].allocate(nbytes, f"gradient of tied {tie.name} from pack {s}")
                _typed(buf, src).copy_(src)
                self.held[(n, s)] = (buf, loc)

    # -- weights ------------------------------------------------------------------------------
    def after_update(self, rt: Runtime, p: int, flat: torch.Tensor, base: int = 0,
                     params: range | None = None) -> None:
        """Pack ``p`` was updated and its new weights are ``flat``: refresh the copies. With
        ``params`` (trainable indices: one chunk of an NVMe pack's update), only the copies
        of those parameters, and ``flat`` holds the pack's weights from byte ``base`` on."""
        for tie in self.ties:
            if tie.owner != p or not tie.master.requires_grad:
                continue
            owner = rt.packs[p]
            if params is not None and _index(owner, tie.master) not in params:
                continue
            src_entry = next(e for e in owner.layout.entries if e.tensor is tie.master)
            src = src_entry.view(flat, base)
            src_loc = owner.home if owner.home is not Loc.NVME else Loc.HOST
            for sharer in tie.sharers:
                self._refresh(rt, rt.packs[sharer.pack], sharer.copy, src, src_loc)

    @staticmethod
    def _refresh(rt: Runtime, pack: Pack, copy: nn.Parameter, src: torch.Tensor,
                 src_loc: Loc) -> None:
        entry = next(e for e in pack.layout.entries if e.tensor is copy)
        nbytes = entry.nbytes
        if pack.index in rt.w_dev:  # a loaded device copy of the sharer's weights
            rt._wait_w(pack.index)  # (its load must not land after this write)
            rt.engine.host_write(entry.view(rt.w_dev[pack.index]),
                                 f"the tied copy in pack {pack.index}'s loaded weights")
            entry.view(rt.w_dev[pack.index]).copy_(src)
            if src_loc is not Loc.DEVICE:
                rt.engine.count(link(src_loc, Loc.DEVICE), "W", nbytes)
        if pack.home_w is not None:
            rt.engine.host_write(entry.view(pack.home_w),
                                 f"the tied copy in pack {pack.index}'s home weights")
            entry.view(pack.home_w).copy_(src)
            if src_loc is not pack.home:
                rt.engine.count(link(src_loc, pack.home), "W", nbytes)
            return
        # Home on NVMe: the file of the chunk holding the copy is rewritten with the new
        # slice (the read waits in the store for a write of that file still in flight: the
        # sharer's own update may have just written it).
        chunk = pack.chunk_of(entry)
        key = pack.key("W", chunk.index)
        host = rt.tiers[Loc.HOST]
        buf = host.allocate(chunk.w_bytes, f"weights of pack {pack.index} (tied copy)")
        rt.engine.synchronize(rt._nvme_read(key, buf, link(Loc.NVME, Loc.HOST), "W"),
                              link(Loc.NVME, Loc.HOST))
        entry.view(buf, chunk.w[0]).copy_(src)
        handle = rt._nvme_write(key, buf, link(Loc.HOST, Loc.NVME), "W")
        host.release(buf, after=handle)

    def abandon(self, rt: Runtime) -> None:
        """A failed step: give the gradients held aside back to their tiers."""
        for buf, loc in self.held.values():
            rt.tiers[loc].release(buf)
        self.held.clear()
        self.merged.clear()
