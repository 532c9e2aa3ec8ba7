"""Models built on the meta device, given their values one layer at a time.

A model built under ``with torch.device("meta"):`` (or :func:`empty_weights`, which keeps
buffers real) has the shapes of its parameters but no memory behind them, so a model larger
than host memory costs nothing to build. :class:`Materializer` gives such a model's tensors
their values where the trainer needs them, never the whole model at once:

* while the profile measures layer ``i`` (:meth:`Materializer.layer`), its meta tensors are
  bound to a host buffer of that layer's size and filled, and go back to the meta device after;
* when a pack is built (:meth:`Materializer.pack_values`, the hook of
  :meth:`harmony.runtime.pack.Pack.build`), each piece of the pack's flat weights (a pack at its
  home on the device or the host, or one chunk of it on its way to an NVMe file) is filled from the
  layers' values, one layer (``init=``) or one tensor (``weights=``) at a time.

Values come from ``weights=`` (:mod:`harmony.io.weights`: a safetensors file, a Hugging Face
directory of shards, or a harmony checkpoint; every tensor the file holds is taken from it),
or from ``init``, a function that initializes one layer's parameters in place (default:
:func:`default_init`). ``init`` runs with torch's generator seeded by ``(seed, layer)``, so a
layer's values do not depend on the packs, on the order layers are built in, nor on how many
times it is materialized (the profile and the pack both do); the floating-point tensors it
leaves unset (still NaN, which they are filled with first) are refused, naming them.

Tied weights (one parameter used by several layers): a layer using a tensor that an earlier
layer owns takes the earlier layer's value, and a copy made for a later pack
(:func:`harmony.model.tied.untie`) takes its master's (:meth:`Materializer.alias`).

>>> with empty_weights():
...     layer = torch.nn.Linear(4, 3)
>>> layer.weight.is_meta, layer.weight.shape
(True, torch.Size([3, 4]))
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from harmony.io.weights import WeightFiles, WeightsError
from harmony.model.chain import user_module
from swap.tier import OutOfCapacity, Tier

if TYPE_CHECKING:
    from harmony.model.chain import Chain
    from harmony.model.layout import Entry, Layout

Init = Callable[[nn.Module], None]
# (nbytes, what) -> a uint8 CPU buffer, and its release: where materialized layers live
Alloc = Callable[[int, str], torch.Tensor]
Free = Callable[[torch.Tensor], None]

_ALIGN = 64


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real.

    Parameters are what is large; buffers (a rotary table, running statistics, position ids)
    are small, and many are computed in ``__init__`` and saved nowhere, so they must keep the
    values construction gives them. This is what ``accelerate.init_empty_weights(
    include_buffers=False)`` does, without needing accelerate.

    Example::

        with harmony.empty_weights():
            model = MyModel(config)          # no parameter memory allocated
        trainer = harmony.Trainer(model, loss_fn, init=my_init)
    """
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = to_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def default_init(layer: nn.Module, model: nn.Module | None = None) -> None:
    """Initialize ``layer`` in place as its modules' constructors would: each submodule's own
    ``reset_parameters()``; for a Hugging Face model (``model`` has ``_init_weights``), the
    model's ``_init_weights`` on every submodule instead, as ``from_config`` does."""
    hf = getattr(model, "_init_weights", None) if model is not None else None
    with torch.no_grad():
        for module in layer.modules():
            if callable(hf):
                hf(module)
            elif (reset := _reset_of(module)) is not None:
                reset()


def _reset_of(module: nn.Module) -> Callable[[], None] | None:
    """A module's own initialization: ``reset_parameters()`` (``_reset_parameters()`` for the
    few torch modules that name it so, e.g. ``nn.MultiheadAttention``), or None."""
    for name in ("reset_parameters", "_reset_parameters"):
        reset = getattr(module, name, None)
        if callable(reset):
            return reset
    return None


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The (qualified name, tensor) of every parameter and buffer of ``module``, each once."""
    seen: set[int] = set()
    out = []
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _placeholder(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as the kind of tensor ``t`` is (a Parameter keeps ``requires_grad``), for
    :func:`torch.utils.swap_tensors` (the object ``t`` itself stays: the model, the trainer's
    layouts and tied weights hold it)."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(value, requires_grad=t.requires_grad)
    return value


class Scratch:
    """Host buffers for layers being materialized, counted in a budget: from the first of
    ``tiers`` with room (the host tier; on CPU then the device tier, host memory too).

    Raises (from :meth:`alloc`):
        swap.tier.OutOfCapacity: no tier has room for one layer; the message names it.
    """

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)
        self._from: dict[int, Tier] = {}

    def alloc(self, nbytes: int, what: str) -> torch.Tensor:
        for tier in self.tiers[:-1]:
            try:
                buf = tier.allocate(nbytes, what)
            except OutOfCapacity:
                continue
            self._from[buf.data_ptr()] = tier
            return buf
        buf = self.tiers[-1].allocate(nbytes, what)
        self._from[buf.data_ptr()] = self.tiers[-1]
        return buf

    def free(self, buf: torch.Tensor) -> None:
        self._from.pop(buf.data_ptr()).release(buf)


class Materializer:
    """The values of a chain's meta tensors, made one layer at a time (see the module's text).

    Args:
        chain: the model's chain of layers.
        init: ``layer -> None``, initializing the layer's parameters in place; default
            :func:`default_init`. Not with ``weights``.
        weights: a path :meth:`harmony.io.weights.WeightFiles.open` reads, or such files.
        seed: ``init`` runs with torch's CPU generator seeded from ``(seed, layer index)``.

    Raises:
        ValueError: ``init`` and ``weights`` both given; ``init`` for a model that has its
            values already; a module the default init cannot initialize; a meta tensor that
            no source gives a value.
        harmony.io.weights.WeightsError: ``weights`` unreadable, missing a key the model needs,
            or holding another shape.
    """

    def __init__(self, chain: Chain, init: Init | None = None,
                 weights: str | os.PathLike[str] | WeightFiles | None = None,
                 seed: int = 0) -> None:
        if init is not None and weights is not None:
            raise ValueError("init= and weights= both given: the values come from one of them; "
                             "drop init= to load the file, or weights= to initialize afresh")
        if init is not None and not callable(init):
            raise ValueError(f"init={init!r} is not callable; pass a function that initializes "
                             "one layer's parameters in place, e.g. lambda layer: "
                             "layer.apply(my_init)")
        self.chain, self.seed = chain, seed
        self.files = weights if weights is None or isinstance(weights, WeightFiles) \
            else WeightFiles.open(weights)
        self.init = init
        self._given_init = init is not None
        self._warned = False  # (that the default init runs on a meta model)
        self._alloc: Alloc = lambda n, what: torch.empty(n, dtype=torch.uint8)
        self._free: Free = lambda buf: None
        self._aliases: dict[int, Callable[[], torch.Tensor]] = {}
        # (layer, tensor) for every tensor of the chain, each at its first layer
        self._owner: dict[int, int] = {}
        self._names: dict[int, str] = {}
        for i, layer in enumerate(chain.layers):
            for name, t in _tensors(user_module(layer)):
                if id(t) not in self._owner:
                    self._owner[id(t)] = i
                    self._names[id(t)] = f"{chain.names[i]}.{name}"
        keys: dict[int, list[str]] = {}
        for k, v in chain.model.state_dict(keep_vars=True).items():
            keys.setdefault(id(v), []).append(k)
        self._keys = keys
        self.meta = any(t.is_meta for layer in chain.layers for _, t in _tensors(layer))
        self._check()

    @property
    def active(self) -> bool:
        """Whether this materializer gives values at all (a meta model, or ``weights=``)."""
        return self.meta or self.files is not None

    def use_weights(self, weights: str | os.PathLike[str] | WeightFiles) -> None:
        """Take the values from ``weights`` from now on (a checkpoint loaded into a model
        whose packs are not built yet), instead of ``init`` or earlier files.

        Raises:
            harmony.io.weights.WeightsError: as for ``weights=``; nothing changes then.
        """
        files = weights if isinstance(weights, WeightFiles) else WeightFiles.open(weights)
        before = self.files, self.init, self._given_init
        self.files, self.init, self._given_init = files, None, False
        try:
            self._check()
        except BaseException:
            self.files, self.init, self._given_init = before
            raise

    def done(self) -> None:
        """The packs are built and hold every value: give none from now on (a re-plan takes
        the trained values, not the files or ``init``)."""
        self.files, self.meta = None, False
        self._aliases.clear()

    def memory(self, scratch: Scratch) -> None:
        """Take the buffers of materialized layers from ``scratch`` (the trainer's tiers, so
        they count against the budgets) and give them back to it."""
        self._alloc, self._free = scratch.alloc, scratch.free

    # -- checks -----------------------------------------------------------------------------
    def _check(self) -> None:
        if self.files is not None:
            return self._check_files()
        if not self.meta:
            if self._given_init:
                raise ValueError("init= initializes a model built on the meta device, but this "
                                 "model's parameters have values already; drop init=, or build "
                                 "the model under torch.device('meta') or harmony.empty_weights()")
            return
        if self._given_init:
            return
        hf = callable(getattr(self.chain.model, "_init_weights", None))
        bad = []
        for i, layer in enumerate(self.chain.layers):
            for mod_name, module in user_module(layer).named_modules():
                own = [n for n, t in [*module.named_parameters(recurse=False),
                                      *module.named_buffers(recurse=False)]
                       if t is not None and t.is_meta]
                if own and not hf and _reset_of(module) is None:
                    where = ".".join(x for x in (self.chain.names[i], mod_name) if x)
                    bad.append(f"{where} ({type(module).__name__}: {', '.join(own)})")
        if bad:
            raise ValueError(
                f"the model is on the meta device and its default initialization, each "
                f"module's reset_parameters(), cannot set {'; '.join(bad[:5])}"
                f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}: those modules have "
                "none. Pass init=fn (initializes one layer's tensors in place) or weights=PATH; "
                "buffers computed in __init__ stay real if the model is built under "
                "harmony.empty_weights()")

    def _check_files(self) -> None:
        assert self.files is not None
        missing, wrong = [], []
        for layer in self.chain.layers:
            for _, t in _tensors(layer):
                key = self._file_key(t)
                if key is None:
                    if t.is_meta:
                        missing.append(self._names[id(t)])
                    continue
                shape = self.files.info(key).shape
                if shape != tuple(t.shape):
                    wrong.append(f"{key} is {shape} there, {tuple(t.shape)} here")
        if missing or wrong:
            raise WeightsError(
                f"weights={self.files.origin!r} does not fit the model: "
                + (f"no value for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                   f"({len(missing)} tensors); " if missing else "")
                + ("; ".join(wrong[:5]) + ("; ..." if len(wrong) > 5 else "") if wrong else "")
                + ". Give the weights of this model (the keys of model.state_dict())")

    def _file_key(self, t: torch.Tensor) -> str | None:
        """The key under which ``weights`` holds ``t`` (any of its keys), or None."""
        if self.files is None:
            return None
        return next((k for k in self._keys.get(id(t), []) if k in self.files), None)

    # -- values -----------------------------------------------------------------------------
    def alias(self, copy: torch.Tensor, value: Callable[[], torch.Tensor]) -> None:
        """``copy`` (a tied weight's copy for a later pack) takes its value from ``value()``."""
        self._aliases[id(copy)] = value

    def direct(self, t: torch.Tensor) -> bool:
        """Whether :meth:`value` gives ``t``'s value without materializing its layer: it
        copies a master, comes from the files, or has its value already."""
        return id(t) in self._aliases or self._file_key(t) is not None or not t.is_meta

    def value(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s value where :meth:`direct` (a new tensor, or ``t`` itself)."""
        if id(t) in self._aliases or self._file_key(t) is not None:
            return self._value(t)
        if t.is_meta:
            raise ValueError(f"{self._names.get(id(t), '?')} is on the meta device and has no "
                             "value yet; materialize its layer first")
        return t.detach()

    def _layer_seed(self, i: int) -> int:
        digest = hashlib.sha256(f"harmony-init/{self.seed}/{i}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[None]:
        """Layer ``i``'s meta tensors bound to host memory holding their values, for the body
        (then back on the meta device, their memory released). A no-op for a layer with no
        meta tensor."""
        layer = self.chain.layers[i]
        tensors = [t for _, t in _tensors(layer) if t.is_meta]
        if not tensors:
            yield
            return
        sizes = [_aligned(t.numel() * t.element_size()) for t in tensors]
        buf = self._alloc(sum(sizes), f"layer {i} ({self.chain.names[i]!r}) being materialized")
        offset, bound = 0, []
        try:
            for t, n in zip(tensors, sizes):
                view = buf[offset:offset + t.numel() * t.element_size()].view(t.dtype)
                torch.utils.swap_tensors(t, _placeholder(t, view.view(t.shape)))
                bound.append(t)
                offset += n
            with torch.no_grad():
                self._fill(i, layer, tensors)
            yield
        finally:
            for t in bound:
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                if not t.is_meta:  # (a pack may have bound it elsewhere already)
                    torch.utils.swap_tensors(t, _placeholder(t, meta))
            del bound, tensors
            self._free(buf)

    def _fill(self, i: int, layer: nn.Module, tensors: Sequence[torch.Tensor]) -> None:
        """Give ``tensors`` (layer ``i``'s, bound to host memory) their values."""
        if self.files is not None:
            for t in tensors:
                t.copy_(self._value(t))
            return
        for t in tensors:
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))  # what init leaves unset stays NaN
            else:
                t.zero_()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._layer_seed(i))
            if self.init is not None:
                self.init(user_module(layer))
            else:
                if not self._warned:  # (a model meant to be loaded that was not, say)
                    self._warned = True
                    warnings.warn(
                        "the model is on the meta device and neither init= nor weights= was "
                        "given: each layer is initialized afresh with its modules' own "
                        "reset_parameters(); pass Trainer(..., weights=PATH) to train from "
                        "saved values, or init=fn to choose the initialization",
                        stacklevel=2)
                default_init(user_module(layer), self.chain.model)
        for t in tensors:  # tensors an earlier layer owns (tied) or that copy a master
            if id(t) in self._aliases:
                t.copy_(self._aliases[id(t)]())
        earlier = sorted({k for t in tensors if (k := self._owner.get(id(t), i)) < i})
        for k in earlier:
            with self.layer(k):  # (its init writes the shared tensors bound here in place)
                pass
        unset = [self._names.get(id(t), "?") for t in tensors
                 if (t.is_floating_point() or t.is_complex()) and bool(torch.isnan(t).any())]
        if unset:
            raise ValueError(
                f"initializing layer {i} ({self.chain.names[i]!r}) left {unset[:5]} unset (or "
                "NaN): " + ("the init= function given does not set them; make it initialize "
                            "every parameter and buffer of the layer in place"
                            if self._given_init else
                            "reset_parameters() does not set them; pass init= or weights=, "
                            "or build the model under harmony.empty_weights() so that "
                            "buffers keep the values __init__ gives them"))

    def _value(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s value from the aliases or the files (not for init)."""
        if id(t) in self._aliases:
            return self._aliases[id(t)]()
        key = self._file_key(t)
        if key is None:
            raise WeightsError(f"weights={self.files.origin if self.files else None!r} has no "
                               f"value for {self._names.get(id(t), '?')}")
        assert self.files is not None
        return self.files.read(key)

    # -- packs ------------------------------------------------------------------------------
    def pack_values(self, layers: Sequence[nn.Module], first: int, layout: Layout) -> PackFill:
        """The values of a pack of ``layers`` (the first being chain layer ``first``), laid out
        by ``layout``: the hook :meth:`harmony.runtime.pack.Pack.build` fills its buffers with."""
        return PackFill(self, list(layers), first, layout)


class PackFill:
    """Fills pieces of a pack's flat weights (``"W"``) or fp32 masters (``"M"``) with the values
    of its layers, one layer (or, from files, one tensor) at a time; made by
    :meth:`Materializer.pack_values`."""

    def __init__(self, source: Materializer, layers: list[nn.Module], first: int,
                 layout: Layout) -> None:
        self.source, self.layers, self.first, self.layout = source, layers, first, layout
        self._layer_of: dict[int, int] = {}
        for j, layer in enumerate(layers):
            for _, t in _tensors(layer):
                self._layer_of.setdefault(id(t), j)

    def fill(self, kind: str, flat: torch.Tensor, start: int, end: int) -> None:
        """Write the entries whose bytes start in ``[start, end)`` of the layout into ``flat``,
        which holds those bytes (``flat[0]`` is byte ``start``)."""
        master = kind == "M"
        entries = [e for e in (self.layout.trainable if master else self.layout.entries)
                   if start <= (e.g_offset if master else e.offset) < end]

        def dst(e: Entry) -> torch.Tensor:
            return e.gview(flat, start) if master else e.view(flat, start)

        source = self.source
        by_layer: dict[int, list[Entry]] = {}
        for e in entries:
            by_layer.setdefault(self._layer_of.get(id(e.tensor), 0), []).append(e)
        with torch.no_grad():
            for j, group in sorted(by_layer.items()):
                if all(source.direct(e.tensor) for e in group):
                    for e in group:  # one tensor at a time
                        dst(e).copy_(source.value(e.tensor))
                    continue
                with source.layer(self.first + j):  # init: the whole layer, once
                    for e in group:
                        dst(e).copy_(e.tensor.detach())

    def settle(self) -> None:
        """Before the pack binds its tensors to its buffers: the ones still on the meta device
        become (empty) host tensors, which can be bound."""
        for e in self.layout.entries:
            if e.tensor.is_meta:
                empty = torch.empty(0, dtype=e.tensor.dtype)
                torch.utils.swap_tensors(e.tensor, _placeholder(e.tensor, empty))
