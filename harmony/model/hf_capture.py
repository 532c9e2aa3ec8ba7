"""What a Hugging Face model's forward passes its blocks, captured by running that forward.

:func:`run_stubbed` runs the model's own ``forward`` with every block's ``forward`` replaced by
a stub that records the arguments it was called with and returns its input hidden state
unchanged (in the block's output format). The model's code therefore computes, for the batch
at hand and with no per-family knowledge here, everything its blocks receive: position ids,
rotary or ALiBi tables, the causal or sliding-window mask, the embeddings (scaled, normalised,
with learned positions added...). Stopping at the last block's call leaves the final norm and
the head unrun.

:class:`Structures` turns one such capture into values a chain can carry between layers (a
tuple of tensors) and back into each block's arguments:

* the hidden state (the first argument of the first block) comes first;
* then a small ``uint8`` *tag* of shape ``(batch, id + 1)``: ``id`` numbers the capture's
  :class:`Structure` (which argument of which block is which carried tensor, and the values of
  the constant ones: ``None``, flags, ...). Masks appear or vanish with the sequence length
  (sdpa needs no mask within a sliding window), so the structure can differ from batch to
  batch; reading it from the tag's shape needs no device synchronisation;
* then every other distinct tensor the blocks receive (once each, however many blocks share
  it), with dimensions broadcast by ``expand`` (a mask repeated over the batch) carried at size
  1 and expanded again for the blocks;
* then the model's inputs, for the head's code (``input_ids``).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["HOW_TO", "Capture", "OutputFormat", "Structure", "Structures", "Unsplittable",
           "hidden_argument", "run_stubbed"]

HOW_TO = ("declare the chain by hand: give a module wrapping the model a method harmony_chain() "
          "returning (name, layer) pairs (an embedding layer, one layer per block, a head); each "
          "layer takes the previous layer's output, a tensor or a tuple of tensors spread over "
          "its positional arguments (see docs/hf.md)")


class Unsplittable(ValueError):
    """A model harmony cannot split into a chain automatically; the message says why."""


class _Stop(Exception):
    """Ends the model's forward at the last block (nothing after it is computed)."""


@dataclass
class OutputFormat:
    """What a block returns: the hidden state alone, or a tuple whose first item it is (the
    other items, ``None`` or tensors, are returned as the real block returned them)."""

    rest: tuple[Any, ...] | None = None  # None: a tensor

    def wrap(self, hidden: torch.Tensor) -> Any:
        return hidden if self.rest is None else (hidden, *self.rest)

    @staticmethod
    def hidden_of(out: Any, where: str) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise Unsplittable(f"{where} returned a {type(out).__name__}; harmony splits models whose "
                           f"blocks return their hidden state, alone or first in a tuple; {HOW_TO}")


@dataclass
class Capture:
    """One run of the model's forward with its blocks stubbed.

    Attributes:
        calls: per block call, in order: (index in the block list, args, kwargs).
        returned: what the forward returned (None when it stopped at the last block).
        outputs: per block call, what its stub returned.
    """

    calls: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    returned: Any = None
    outputs: list[Any] = field(default_factory=list)


def hidden_argument(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The block's first argument (its hidden state), given positionally or by name."""
    if args:
        return args[0]
    params = list(inspect.signature(type(block).forward).parameters)
    name = params[1] if len(params) > 1 else None
    if name is None or name not in kwargs:
        raise Unsplittable(f"{type(block).__name__} was called without its first argument "
                           f"({name!r}); harmony cannot tell its hidden state")
    return kwargs[name]


@contextlib.contextmanager
def _stubs(blocks: Sequence[nn.Module],
           stub: Callable[[int, tuple[Any, ...], dict[str, Any]], Any]) -> Iterator[None]:
    """Replace each block's ``forward`` by ``stub(index, args, kwargs)``; restore on exit."""
    saved = []
    for i, block in enumerate(blocks):
        saved.append(block.__dict__.get("forward"))

        def forward(*args: Any, _i: int = i, **kwargs: Any) -> Any:
            return stub(_i, args, kwargs)

        block.__dict__["forward"] = forward
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = old


def run_stubbed(call: Callable[[], Any], blocks: Sequence[nn.Module],
                output: Callable[[int, int, torch.Tensor, tuple[Any, ...], dict[str, Any]], Any],
                stop_after: int | None) -> Capture:
    """Run ``call()`` (the model's forward) with every block's forward stubbed.

    Args:
        call: runs the model's forward on the batch.
        blocks: the block list.
        output: ``(call number, block index, hidden, args, kwargs) -> what the stub
            returns``.
        stop_after: end the forward after this many block calls (None: run it to the end).

    Returns:
        The :class:`Capture`.
    """
    cap = Capture()

    def stub(i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        cap.calls.append((i, args, kwargs))
        hidden = hidden_argument(blocks[i], args, kwargs)
        if not isinstance(hidden, torch.Tensor):
            raise Unsplittable(f"block {i} ({type(blocks[i]).__name__}) was called with a "
                               f"{type(hidden).__name__} as its hidden state")
        out = output(len(cap.calls) - 1, i, hidden, args, kwargs)
        cap.outputs.append(out)
        if stop_after is not None and len(cap.calls) >= stop_after:
            raise _Stop
        return out

    with _stubs(blocks, stub), contextlib.suppress(_Stop):
        cap.returned = call()
    return cap


# -- structures ------------------------------------------------------------------------------

_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
           torch.layout, torch.memory_format, enum.Enum, slice, type(Ellipsis))


def _simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


@dataclass(frozen=True)
class _Slot:
    """A carried tensor: its sizes along the dimensions it was broadcast over (``expand``),
    where ``-1`` stands for the batch; empty when carried as it is."""

    expanded: tuple[tuple[int, int], ...] = ()  # (dim, size)


@dataclass(frozen=True)
class Structure:
    """Which argument of each block call is what: per call, the pytree spec of
    ``(args, kwargs)`` and per leaf ``("h",)`` (the hidden state), ``("s", k)`` (carried
    tensor k) or ``("c", value)`` (a constant); the carried tensors' :class:`_Slot`; and how
    many model inputs follow them."""

    calls: tuple[tuple[Any, tuple[tuple[Any, ...], ...]], ...]
    slots: tuple[_Slot, ...]
    inputs: int

    def _compare_key(self) -> tuple[Any, ...]:
        """Equal for equal structures: constants compared by type and value where simple
        (None, flags, numbers...), by identity otherwise."""
        calls = tuple((spec, tuple(
            ("c", type(leaf[1]), leaf[1] if _simple(leaf[1]) else id(leaf[1]))
            if leaf[0] == "c" else leaf for leaf in coded)) for spec, coded in self.calls)
        return (calls, self.slots, self.inputs)


class Structures:
    """The structures seen so far, numbered in order; what prologue and blocks share.

    Args:
        names: per block call, the block's name (for messages).
        limit: how many different structures may be seen before harmony concludes that the
            model passes its blocks something that changes with every batch.
    """

    def __init__(self, names: Sequence[str], limit: int = 64) -> None:
        self.names = list(names)
        self.limit = limit
        self.seen: list[Structure] = []
        self._index: dict[tuple[Any, ...], int] = {}
        # per structure, per carried tensor: whether blocks need its gradient (None: unknown
        # yet; a tensor that carries no gradient in the model's forward is detached for them)
        self.grad: list[list[bool | None]] = []

    def encode(self, cap: Capture, blocks: Sequence[nn.Module],
               inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The carried value of a capture: ``(hidden, tag, *slots, *inputs)``.

        Raises:
            Unsplittable: the blocks receive something harmony cannot carry.
        """
        if not cap.calls:
            raise Unsplittable("the model's forward called none of its blocks")
        i0, args0, kwargs0 = cap.calls[0]
        hidden = hidden_argument(blocks[i0], args0, kwargs0)
        slots: list[torch.Tensor] = []
        slot_of: dict[int, int] = {}
        calls = []
        for n, (_, args, kwargs) in enumerate(cap.calls):
            leaves, spec = pytree.tree_flatten((args, kwargs))
            coded: list[tuple[Any, ...]] = []
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    if leaf is hidden:
                        coded.append(("h",))
                        continue
                    if id(leaf) not in slot_of:
                        slot_of[id(leaf)] = len(slots)
                        slots.append(leaf)
                    coded.append(("s", slot_of[id(leaf)]))
                elif _simple(leaf):
                    coded.append(("c", leaf))
                else:
                    if any(isinstance(t, torch.Tensor) for t in _tensors_in(leaf)):
                        raise Unsplittable(
                            f"{self.names[n]} receives a {type(leaf).__name__} holding tensors, "
                            "which harmony cannot carry between layers (it carries tensors, "
                            "and tuples, lists and dicts of them); for attention backends that "
                            "pass such objects (flex attention's BlockMask), set "
                            "config._attn_implementation to 'sdpa' or 'eager'")
                    coded.append(("c", leaf))
            calls.append((spec, tuple(coded)))
        carried, infos = [], []
        for t in slots:
            small, info = _compact(t, hidden.shape[0])
            carried.append(small)
            infos.append(info)
        structure = Structure(tuple(calls), tuple(infos), len(inputs))
        sid = self._register(structure)
        grads = self.grad[sid]
        if torch.is_grad_enabled():
            for k, t in enumerate(slots):
                grads[k] = bool(grads[k]) or t.requires_grad
        tag = torch.zeros((hidden.shape[0], sid + 1), dtype=torch.uint8, device=hidden.device)
        return (hidden, tag, *carried, *inputs)

    def _register(self, structure: Structure) -> int:
        key = structure._compare_key()
        sid = self._index.get(key)
        if sid is not None:
            return sid
        if len(self.seen) >= self.limit:
            raise Unsplittable(
                f"the model's forward has passed its blocks {self.limit} differently structured "
                "sets of arguments (something that is not a tensor changes from batch to "
                "batch); declare the chain by hand (docs/hf.md)")
        self._index[key] = len(self.seen)
        self.seen.append(structure)
        self.grad.append([None] * len(structure.slots))
        return len(self.seen) - 1

    def structure(self, tag: torch.Tensor) -> tuple[int, Structure]:
        """The structure a carried value's tag names."""
        sid = tag.shape[1] - 1
        if not 0 <= sid < len(self.seen):
            raise RuntimeError(f"a chain value names structure {sid}, but only {len(self.seen)} "
                               "were seen in this process; the value was not made here")
        return sid, self.seen[sid]

    def arguments(self, n: int, hidden: torch.Tensor, tag: torch.Tensor,
                  carried: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Block call ``n``'s ``(args, kwargs)`` from a carried value."""
        sid, s = self.structure(tag)
        spec, coded = s.calls[n]
        grads = self.grad[sid]
        values = []
        for leaf in coded:
            if leaf[0] == "h":
                values.append(hidden)
            elif leaf[0] == "s":
                k = leaf[1]
                t = _expand(carried[k], s.slots[k], hidden.shape[0])
                values.append(t.detach() if grads[k] is False else t)
            else:
                values.append(leaf[1])
        args, kwargs = pytree.tree_unflatten(values, spec)
        return tuple(args), dict(kwargs)

    def inputs(self, tag: torch.Tensor, carried: Sequence[torch.Tensor],
               ) -> tuple[torch.Tensor, ...]:
        """The model's inputs carried at the end of a value."""
        _, s = self.structure(tag)
        return tuple(carried[len(s.slots):len(s.slots) + s.inputs])


def _tensors_in(obj: Any) -> list[Any]:
    try:
        return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]
    except TypeError:
        return []


def _compact(t: torch.Tensor, batch: int) -> tuple[torch.Tensor, _Slot]:
    """``t`` without the repeats of its broadcast (stride 0) dimensions, and how to expand it."""
    expanded = []
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            expanded.append((d, -1 if d == 0 and size == batch else size))
            t = t.narrow(d, 0, 1)
    return t, _Slot(tuple(expanded))


def _expand(t: torch.Tensor, slot: _Slot, batch: int) -> torch.Tensor:
    if not slot.expanded:
        return t
    sizes = list(t.shape)
    for d, size in slot.expanded:
        sizes[d] = batch if size == -1 else size
    return t.expand(sizes)
