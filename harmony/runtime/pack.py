"""A pack's state: its layers, flat layout, home copy of the weights, and optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from harmony.model.layout import Entry, Layout
from harmony.model.precision import Precision
from harmony.planning.chunks import Chunk, layout_chunks
from schedules.task import Loc
from swap.nvme import NvmeStore
from swap.tier import Tier


class NothingToTrain(torch.optim.Optimizer):
    """The optimizer of a pack with no trainable parameters: no parameter groups, no state,
    and a step that does nothing (learning-rate schedulers accept it)."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {})
        self.param_groups = []

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


class PackValues(Protocol):
    """What fills a pack's buffers as :meth:`Pack.build` lays them out."""

    def fill(self, kind: str, flat: torch.Tensor, start: int, end: int) -> None:
        """Write the weights (``kind`` ``"W"``) or fp32 masters (``"M"``) whose bytes start in
        ``[start, end)`` of the layout into ``flat``, which holds those bytes."""

    def settle(self) -> None:
        """Called once every buffer is filled, before the layers' tensors are bound to them."""


class OwnValues:
    """The layers' tensors' own values (a model built with its weights)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def fill(self, kind: str, flat: torch.Tensor, start: int, end: int) -> None:
        with torch.no_grad():
            if kind == "M":
                for e in self.layout.trainable:
                    if start <= e.g_offset < end:
                        e.gview(flat, start).copy_(e.tensor.detach())
                return
            for e in self.layout.entries:
                if start <= e.offset < end:
                    e.view(flat, start).copy_(e.tensor.detach())

    def settle(self) -> None:
        return None


@dataclass
class Pack:
    """Everything harmony keeps about one pack (one record, not parallel dicts).

    The home flat buffer ``home_w`` holds the master weights on the pack's home tier. When the
    home is the device, the layers' parameters are views of it for good; otherwise they are bound
    to a device copy while the pack is swapped in and to empty tensors in between, and the
    optimizer steps ``masters``: parameters that are views of ``home_w``.

    With the home on NVMe, ``home_w`` is None and the pack is split into ``chunks`` of
    parameters (:mod:`harmony.planning.chunks`; one chunk unless the plan streams updates in
    chunks). Each chunk has its own files in ``store`` (:meth:`key`): its slice of the weights
    (``W``), of the fp32 masters in mixed precision (``M``), and its optimizer state (``K``),
    laid out by ``k_layouts[c]`` once an update has created it. Masters and optimizer state
    are bound to host buffers only around an update (see :meth:`bind_masters`,
    :meth:`bind_state`) and to empty tensors otherwise.

    Mixed precision (``layout.mixed``, see :mod:`harmony.model.precision`): ``home_w`` holds W in
    the compute dtype and the masters are fp32 views of a separate flat buffer ``home_m`` on the
    same tier, counted as K (on NVMe: the ``M`` files); :meth:`refresh_weights` writes them
    back into W after an update. While ``grad_sink`` is set, each micro-batch's gradients are
    added into it (fp32, laid out by ``Entry.gview``) instead of accumulating on the parameters.
    """

    index: int
    first_layer: int
    layers: list[nn.Module]
    layout: Layout
    home: Loc
    home_tier: Tier
    home_w: torch.Tensor | None
    masters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    k_charged: int
    got_grad: list[bool] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    store: NvmeStore | None = None
    chunks: list[Chunk] = field(default_factory=list)
    # per chunk: (state tensor, offset, shape) of its optimizer state's flat layout on NVMe,
    # and that layout's bytes (None, 0: no state yet)
    k_layouts: list[list[tuple[torch.Tensor, int, torch.Size]] | None] = field(
        default_factory=list)
    k_sizes: list[int] = field(default_factory=list)
    stepped: frozenset[int] = frozenset()  # trainable indices whose masters the optimizer steps
    k_estimate: int = 0  # the optimizer state's bytes expected before an update creates it
    home_m: torch.Tensor | None = None  # mixed precision: fp32 masters (None: in W, or on NVMe)
    grad_sink: torch.Tensor | None = None  # mixed precision: the fp32 G being accumulated
    untrained: frozenset[int] = frozenset()  # ids of tied copies another pack updates
    owned: bool = True  # False: another data-parallel rank owns its optimizer (and masters)

    def key(self, kind: str, chunk: int) -> str:
        """The NVMe file of a chunk's weights (``"W"``), fp32 masters (``"M"``) or optimizer
        state (``"K"``)."""
        return _key(self.index, kind, chunk)

    @property
    def k_bytes(self) -> int:
        """Bytes of the optimizer state laid out for NVMe (all chunks)."""
        return sum(self.k_sizes)

    @staticmethod
    def build(index: int, first_layer: int, layers: list[nn.Module], home: Loc,
              home_tier: Tier,
              factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
              k_estimate: int, store: NvmeStore | None = None,
              precision: Precision | None = None,
              untrained: frozenset[int] = frozenset(), owned: bool = True,
              update_chunk: int | None = None, k_ratio: float = 0.0,
              values: Callable[[Layout], PackValues] | None = None,
              staging: Tier | None = None) -> Pack:
        """Move the layers' weights into a flat buffer at ``home`` and build the optimizer.

        ``values``: makes, for the pack's layout, what fills its buffers (default: the layers'
        tensors' own values; a model built on the meta device gets them from
        :meth:`harmony.model.materialize.Materializer.pack_values`, layer by layer). ``staging``:
        the host tier, which lends the buffer each chunk of an NVMe home passes through on its way
        to its file (one chunk at a time; without it, an uncounted buffer).

        ``k_estimate`` counts the optimizer state and, in mixed precision, the fp32 masters
        (allocated here, so only the rest is charged as an estimate). ``untrained``: ids of
        trainable parameters the optimizer must not hold (copies of tied weights that another
        pack updates, see harmony/model/tied.py); they still get gradients. ``owned`` False: another
        data-parallel rank owns this pack's optimizer (sharded optimizer), so no optimizer
        state and, in mixed precision, no fp32 masters are kept here. ``update_chunk``: with
        the home on NVMe, split the pack into chunks of at most this many bytes of weights
        plus ``k_ratio`` times their gradient bytes (optimizer state and masters), see
        :func:`harmony.planning.chunks.layout_chunks`; None: one chunk.
        """
        layout = Layout(layers, precision.dtype_of if precision is not None else None)
        if home is Loc.NVME and store is None:
            raise ValueError(f"pack {index} is placed on NVMe but there is no nvme_dir")
        # Building is all or nothing: on any failure (the optimizer factory raises, the disk
        # fills up) the layers get their own tensors back and every byte charged or written
        # here is given back, so the caller can restore the model and try again.
        originals = [e.tensor.data for e in layout.entries]
        undo: list[Callable[[], None]] = []
        try:
            return Pack._build(index, first_layer, layers, layout, home, home_tier, factory,
                               k_estimate, store, untrained, owned, update_chunk, k_ratio,
                               values, staging, undo)
        except BaseException:
            for action in reversed(undo):
                with contextlib.suppress(Exception):  # (the error that ended it matters)
                    action()
            for e, t in zip(layout.entries, originals):
                e.tensor.data = t
            raise

    @staticmethod
    def _build(index: int, first_layer: int, layers: list[nn.Module], layout: Layout,
               home: Loc, home_tier: Tier,
               factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
               k_estimate: int, store: NvmeStore | None, untrained: frozenset[int],
               owned: bool, update_chunk: int | None, k_ratio: float,
               values: Callable[[Layout], PackValues] | None, staging: Tier | None,
               undo: list[Callable[[], None]]) -> Pack:
        """:meth:`build`'s work; ``undo`` collects what gives back each thing it takes."""
        chunks = layout_chunks(layout, update_chunk if home is Loc.NVME else None, k_ratio)
        fill = values(layout) if values is not None else OwnValues(layout)

        def at_home(kind: str, nbytes: int, what: str) -> torch.Tensor | None:
            """A flat buffer at home filled with the weights (``kind`` ``"W"``) or masters
            (``"M"``); on NVMe, the chunks' files (None), written one chunk at a time."""
            if home is not Loc.NVME:
                buf = home_tier.allocate(nbytes, what)
                undo.append(lambda: home_tier.release(buf))
                fill.fill(kind, buf, 0, nbytes)
                return buf
            assert store is not None
            undo.append(lambda: _delete_pieces(store, index, chunks, kind))
            for c, (a, b) in _pieces(chunks, kind):
                buf = staging.allocate(b - a, f"{what} (chunk {c}) on its way to NVMe") \
                    if staging is not None else torch.empty(b - a, dtype=torch.uint8)
                try:
                    fill.fill(kind, buf, a, b)
                    store.write(_key(index, kind, c), buf).synchronize()
                finally:
                    if staging is not None:
                        staging.release(buf)
            home_tier.charge(nbytes, what)
            undo.append(lambda: home_tier.uncharge(nbytes))
            return None

        home_m: torch.Tensor | None = None
        if layout.mixed and not owned:  # another rank keeps the masters
            k_estimate = 0
        elif layout.mixed:  # fp32 masters, from the fp32 weights before they are rebound
            home_m = at_home("M", layout.g_bytes, f"master weights of pack {index}")
            k_estimate = max(0, k_estimate - layout.g_bytes)
        home_w = at_home("W", layout.w_bytes, f"weights of pack {index}")
        fill.settle()
        if layout.mixed:
            layout.bind(home_w if home is Loc.DEVICE else None)
            masters = [nn.Parameter(e.gview(home_m) if home_m is not None
                                    else torch.empty(0, dtype=e.master_dtype))
                       for e in layout.trainable]
        elif home is Loc.DEVICE:
            assert home_w is not None
            layout.bind(home_w)
            masters = [e.tensor for e in layout.trainable if isinstance(e.tensor, nn.Parameter)]
        else:
            layout.bind(None)
            masters = [nn.Parameter(e.view(home_w) if home_w is not None
                                    else torch.empty(0, dtype=e.dtype))
                       for e in layout.trainable]
        # A pack with nothing of its own to train (activations, frozen layers, only copies of
        # tied weights, another rank's pack) gets a stand-in: optimizers refuse an empty
        # parameter list.
        mine = [m for m, e in zip(masters, layout.trainable) if id(e.tensor) not in untrained]
        opt = factory(mine) if mine and owned else NothingToTrain()
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}; it must return "
                            "a torch.optim.Optimizer built over the parameters it is given")
        home_tier.charge(k_estimate, f"optimizer state of pack {index}")
        undo.append(lambda: home_tier.uncharge(k_estimate))
        held = {id(q) for group in opt.param_groups for q in group["params"]}
        pack = Pack(index, first_layer, layers, layout, home, home_tier, home_w, masters, opt,
                    k_estimate, [False] * len(layout.trainable), store=store, chunks=chunks,
                    k_layouts=[None] * len(chunks), k_sizes=[0] * len(chunks),
                    stepped=frozenset(i for i, m in enumerate(masters) if id(m) in held),
                    k_estimate=k_estimate,
                    home_m=home_m, untrained=untrained, owned=owned)
        undo.append(pack.close)
        for i, e in enumerate(layout.trainable):
            pack.hooks.append(e.tensor.register_post_accumulate_grad_hook(  # type: ignore[union-attr]
                lambda _p, i=i: pack._mark(i)))
        return pack

    def _mark(self, i: int) -> None:
        self.got_grad[i] = True
        if self.grad_sink is not None:  # mixed precision: accumulate in fp32, off the param
            e = self.layout.trainable[i]
            assert e.tensor.grad is not None
            e.gview(self.grad_sink).add_(e.tensor.grad)
            e.tensor.grad = None

    def refresh_weights(self, flat: torch.Tensor, chunk: Chunk | None = None) -> None:
        """Mixed precision: copy the masters, rounded to the compute dtype, into W ``flat``
        (not the copies of tied weights: their owner's update writes those). With ``chunk``,
        only its masters, into ``flat`` holding that chunk's weights."""
        base, params = (0, range(len(self.masters))) if chunk is None \
            else (chunk.w[0], chunk.params)
        with torch.no_grad():
            for i in params:
                e = self.layout.trainable[i]
                if id(e.tensor) not in self.untrained:
                    e.view(flat, base).copy_(self.masters[i])

    # -- NVMe homes ---------------------------------------------------------------------------
    def bind_masters(self, flat: torch.Tensor | None, chunk: Chunk | None = None) -> None:
        """Point the masters at views of a host copy of the master weights (the weights in
        fp32; None: at empty tensors). With ``chunk``, only its masters, and ``flat`` holds
        that chunk's masters (its bytes ``chunk.m`` of the layout)."""
        base, params = (0, range(len(self.masters))) if chunk is None \
            else (chunk.m[0], chunk.params)
        for i in params:
            m, e = self.masters[i], self.layout.trainable[i]
            m.data = e.gview(flat, base) if flat is not None \
                else torch.empty(0, dtype=e.master_dtype)

    def optimizes(self, c: int) -> bool:
        """Whether the optimizer steps any parameter of chunk ``c`` (so it has state)."""
        return any(i in self.stepped for i in self.chunks[c].params)

    def state_tensors(self, chunk: Chunk | None = None) -> list[torch.Tensor]:
        """The optimizer's state tensors (of ``chunk``'s parameters, or all) in a fixed order
        (by master, then by name)."""
        masters = self.masters if chunk is None else [self.masters[i] for i in chunk.params]
        out = []
        for m in masters:
            state = self.optimizer.state.get(m, {})
            out += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
        return out

    def state_laid_out(self, c: int) -> bool:
        """Whether chunk ``c``'s optimizer state is exactly the tensors of its flat layout
        (False before an update created it, or after one created more)."""
        lay = self.k_layouts[c]
        return lay is not None and [id(t) for t, _, _ in lay] == [
            id(t) for t in self.state_tensors(self.chunks[c])]

    def layout_state(self, c: int) -> None:
        """Lay chunk ``c``'s optimizer state out in one flat buffer (after an update created
        it); no state: no layout (and its file, if any, goes)."""
        offset, layout = 0, []
        for t in self.state_tensors(self.chunks[c]):
            layout.append((t, offset, t.shape))
            offset = (offset + t.numel() * t.element_size() + 63) // 64 * 64
        self.k_layouts[c], self.k_sizes[c] = (layout or None), offset
        if not layout and self.store is not None and self.key("K", c) in self.store:
            self.store.delete(self.key("K", c))

    def state_estimate(self, c: int) -> int:
        """The bytes of optimizer state chunk ``c``'s first update is expected to create (its
        share of the pack's estimate, by gradient bytes of the parameters stepped)."""
        spans = self.layout.trainable_spans()
        total = sum(spans[i][1] for i in self.stepped)
        mine = sum(spans[i][1] for i in self.chunks[c].params if i in self.stepped)
        return self.k_estimate * mine // total if total else 0

    def bind_state(self, c: int, flat: torch.Tensor | None, copy_in: bool = False) -> None:
        """Point chunk ``c``'s state tensors at views of ``flat`` (None: at empty tensors);
        with ``copy_in``, first copy their current values into ``flat``."""
        layout = self.k_layouts[c]
        assert layout is not None
        for t, off, shape in layout:
            if flat is None:
                t.data = torch.empty(0, dtype=t.dtype)
                continue
            view = flat[off:off + shape.numel() * t.element_size()].view(t.dtype).view(shape)
            if copy_in:
                view.copy_(t)
            t.data = view

    def chunk_of(self, entry: Entry) -> Chunk:
        """The chunk whose weights hold ``entry``."""
        return next(c for c in self.chunks if c.w[0] <= entry.offset < c.w[1])

    def read_flat(self, kind: str, nbytes: int) -> torch.Tensor:
        """The weights (``"W"``) or fp32 masters (``"M"``) read from the chunks' files into
        one new flat CPU buffer of ``nbytes``."""
        assert self.store is not None
        flat = torch.empty(nbytes, dtype=torch.uint8)
        handles = [self.store.read(self.key(kind, c), flat[a:b])
                   for c, (a, b) in _pieces(self.chunks, kind)]
        for h in handles:
            h.synchronize()
        return flat

    def write_flat(self, kind: str, flat: torch.Tensor) -> None:
        """Write a flat copy of the weights (``"W"``) or fp32 masters (``"M"``) to the chunks'
        files, and wait for it."""
        assert self.store is not None
        _write_pieces(self.store, self.index, self.chunks, kind, flat)

    def home_weights(self) -> torch.Tensor:
        """The master weights as a flat CPU buffer (read from NVMe when they live there)."""
        if self.home_w is not None:
            return self.home_w
        return self.read_flat("W", self.layout.w_bytes)

    def master_weights(self) -> torch.Tensor:
        """The master weights as a flat CPU-readable buffer laid out by ``Entry.gview``: the
        weights themselves in fp32, the fp32 masters in mixed precision (read from NVMe when
        they live there)."""
        if not self.layout.mixed:
            return self.home_weights()
        if self.home_m is not None:
            return self.home_m
        return self.read_flat("M", self.layout.g_bytes)

    def settle_optimizer_bytes(self) -> None:
        """Replace the estimated optimizer-state charge with the bytes it really holds."""
        if self.home is Loc.NVME:
            real = self.k_bytes
        else:
            real = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                       for t in s.values() if isinstance(t, torch.Tensor))
        if real != self.k_charged:
            self.home_tier.uncharge(self.k_charged)
            self.home_tier.charge(real, f"optimizer state of pack {self.index}")
            self.k_charged = real

    def release(self) -> None:
        """Give this pack's home bytes back to its tier (and delete its files): the layers'
        parameters are left bound to empty tensors, so the caller restores their values."""
        self.close()
        self.layout.bind(None)
        if self.home_w is not None:
            self.home_tier.release(self.home_w)
            self.home_w = None
        else:
            self.home_tier.uncharge(self.layout.w_bytes)
        if self.layout.mixed and self.owned:  # the fp32 masters: a buffer at home, or a file
            if self.home_m is not None:
                self.home_tier.release(self.home_m)
                self.home_m = None
            else:
                self.home_tier.uncharge(self.layout.g_bytes)
        self.home_tier.uncharge(self.k_charged)
        self.k_charged = 0
        if self.store is not None:
            for key in [self.key(kind, c) for c in range(len(self.chunks)) for kind in "WMK"]:
                if key in self.store:
                    self.store.delete(key)
        self.optimizer.state.clear()

    def give_back(self, device_of: Callable[[Entry], torch.device]) -> None:
        """Give every parameter and buffer of the pack's layers a tensor of its own holding
        its current value (a trainable one: its master weights, in its own dtype) on the
        device ``device_of`` names, then :meth:`release` the pack's home bytes and files.
        One pack's weights are copied at a time, so the peak is the home copies plus one
        pack. Not for a pack whose masters another data-parallel rank keeps."""
        assert self.owned or not self.layout.mixed, "another rank keeps this pack's masters"
        flat = self.home_weights()
        masters = self.master_weights() if self.layout.mixed else flat
        values = [(e.gview(masters) if e.trainable else e.view(flat)).to(
            device_of(e), copy=True) for e in self.layout.entries]
        self.release()
        for e, v in zip(self.layout.entries, values):
            e.tensor.data = v

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def _pieces(chunks: list[Chunk], kind: str) -> list[tuple[int, tuple[int, int]]]:
    """(chunk, byte range) of each chunk's file of weights (``"W"``) or fp32 masters (``"M"``:
    only chunks with trainable parameters have one)."""
    if kind == "W":
        return [(c.index, c.w) for c in chunks]
    return [(c.index, c.m) for c in chunks if c.params]


def _key(pack: int, kind: str, chunk: int) -> str:
    return f"pack{pack}.{kind}.{chunk}"


def _delete_pieces(store: NvmeStore, pack: int, chunks: list[Chunk], kind: str) -> None:
    """Delete whatever files of pack ``pack``'s ``kind`` exist (a build that failed)."""
    for c, _ in _pieces(chunks, kind):
        if _key(pack, kind, c) in store:
            store.delete(_key(pack, kind, c))


def _write_pieces(store: NvmeStore, pack: int, chunks: list[Chunk], kind: str,
                  flat: torch.Tensor) -> None:
    """Write the flat weights (``"W"``) or fp32 masters (``"M"``) of pack ``pack`` to its
    chunks' files, and wait for it."""
    handles = [store.write(_key(pack, kind, c), flat[a:b]) for c, (a, b) in
               _pieces(chunks, kind)]
    for h in handles:
        h.synchronize()
