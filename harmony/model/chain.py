"""Turning a model into a chain of layers, and how each layer is called.

Two calling conventions, as the model's own forward would call its parts:

* **one argument** (``nn.Sequential`` and lists of modules): each module receives the previous
  module's output as one argument, a tensor or a tuple alike, exactly as
  ``nn.Sequential.forward`` passes it. The chain's layers are :class:`OneArgument` adapters
  around the modules, so the runtime can keep calling every layer with a tuple spread over
  positional arguments.
* **positional** (``harmony_chain()`` models and Hugging Face models): a tuple output is
  spread over the next layer's positional arguments; a tensor is passed as it is.

A module instance at several positions of a chain (``nn.Sequential(lin, act, lin)``) is one
set of weights used twice: every position after its first gets an :func:`alias` of it (a new
module object holding the same parameters and buffers), so that packs can hold and, for tied
weights, replace their own copy without touching the others (see ``harmony/model/tied.py``).
Parameters used by several layers are trained as tied weights; a buffer used by several
layers is refused (``harmony.model.tied.shared_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from harmony.model.hf import hf_split
from harmony.model.tied import alias

__all__ = ["Chain", "OneArgument", "as_tuple", "call", "checked_loss"]


class _Flow:
    """Whether the value a layer receives came out of its predecessor as a tuple (a
    one-element tuple and a tensor reach the runtime alike: ``as_tuple`` makes both ``(t,)``).
    Kept out of the module tree: a plain object, not a module."""

    def __init__(self) -> None:
        self.tuple_out = False


class OneArgument(nn.Module):
    """A module of an ``nn.Sequential`` as a chain layer: it receives the previous layer's
    output as one argument, as ``nn.Sequential.forward`` passes it.

    The runtime spreads a boundary value over positional arguments (``layer(*value)``), so a
    tuple arrives as several arguments; this adapter packs them back into one tuple. A value
    of one tensor is a tuple only if the previous layer returned a one-element tuple, which
    that layer's adapter records (``flow``); for the first layer, the chain's input decides
    (:meth:`Chain.note_input`).

    Args:
        module: the wrapped module (its parameters are the layer's).
        received: the predecessor's record (or the chain input's).

    Example::

        layer = OneArgument(nn.Linear(2, 2), _Flow())
        layer(torch.ones(1, 2))   # == module(torch.ones(1, 2))
    """

    def __init__(self, module: nn.Module, received: _Flow) -> None:
        super().__init__()
        self.module = module
        self._received = received
        self._flow = _Flow()

    def forward(self, *value: Any) -> Any:
        if len(value) == 1 and not self._received.tuple_out:
            out = self.module(value[0])
        else:
            out = self.module(tuple(value))
        self._flow.tuple_out = isinstance(out, tuple)
        return out


def user_module(layer: nn.Module) -> nn.Module:
    """The user's own module behind a chain layer (an ``nn.Sequential`` entry's adapter
    stands for its module), for naming what belongs to it."""
    return layer.module if isinstance(layer, OneArgument) else layer


class Chain:
    """The layers of a model in the order data flows through them.

    Args:
        model: an ``nn.Sequential`` or a list (or ``nn.ModuleList``) of modules, whose
            modules each receive the previous one's output as one argument, as
            ``nn.Sequential.forward`` passes it; a module with a ``harmony_chain()`` method
            returning its layers in order (modules, or ``(name, module)`` pairs), each called
            with the previous layer's output, a tuple spread over positional arguments; or a
            Hugging Face ``transformers`` (or ``peft``) model, split by
            :func:`harmony.model.hf.hf_split` (positional too).

    Attributes:
        names, layers: the layers and their names (module paths where there are some).
        automatic: harmony split the model by itself (not ``harmony_chain()``); then
            :meth:`reference` tells what the model computes, for ``harmony.model.probe``.
        one_argument: the ``nn.Sequential`` convention.

    Raises:
        ValueError: an empty model, a model harmony cannot decompose (the message says how to
            declare the chain), or parameters that belong to no layer.

    >>> c = Chain(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> c.names
    ['0', '1']
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module]) -> None:
        if isinstance(model, (list, tuple)):
            if not all(isinstance(m, nn.Module) for m in model):
                bad = next(type(m).__name__ for m in model if not isinstance(m, nn.Module))
                raise ValueError(f"model list holds a {bad}; every entry must be an nn.Module")
            model = nn.Sequential(*model)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model is a {type(model).__name__}; pass an nn.Module, "
                             "nn.Sequential or a list of modules")
        self.model = model
        self.automatic = False
        self.one_argument = False
        self._input = _Flow()  # the chain's input, for a one-argument first layer
        self._reference: Callable[[tuple[torch.Tensor, ...], bool], Any] | None = None
        self._probe_slice: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] \
            | None = None
        declared = getattr(model, "harmony_chain", None)
        layers: list[tuple[str, nn.Module]]
        if callable(declared):
            layers = self._declared(model, list(declared()))
        elif (split := hf_split(model)) is not None:
            layers = split.layers
            self.automatic = True
            self._reference = lambda x, single: split.reference(x)
            self._probe_slice = split.probe_inputs
        elif isinstance(model, (nn.Sequential, nn.ModuleList)):
            layers = self._one_argument(model)
        else:
            raise ValueError(
                f"cannot split {type(model).__name__} into a chain of layers: pass an "
                "nn.Sequential or a list of modules, or give the model a method "
                "harmony_chain() that returns its layers in order (each layer takes the previous "
                "layer's output: a tensor or a tuple of tensors)")
        if not layers:
            raise ValueError(f"model {type(model).__name__} has no layers to train")
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        covered = {id(p) for m in self.layers for p in m.parameters()}
        orphans = [n for n, p in model.named_parameters() if id(p) not in covered]
        if orphans:
            raise ValueError(f"parameters {orphans[:5]} of {type(model).__name__} belong to no "
                             "layer of its chain and would never be trained; include their "
                             "modules in harmony_chain()")

    @staticmethod
    def _declared(model: nn.Module, items: list[Any]) -> list[tuple[str, nn.Module]]:
        names = {id(m): n for n, m in model.named_modules()}
        layers: list[tuple[str, nn.Module]] = []
        seen: set[int] = set()
        for i, item in enumerate(items):
            name, mod = item if isinstance(item, tuple) else (names.get(id(item), str(i)), item)
            if not isinstance(mod, nn.Module):
                raise ValueError(f"{type(model).__name__}.harmony_chain() item {i} is a "
                                 f"{type(mod).__name__}, not an nn.Module")
            if id(mod) in seen:  # one module at two positions: the later one an alias
                mod = alias(mod)
            seen.add(id(mod))
            layers.append((name, mod))
        return layers

    def _one_argument(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        # _modules, not named_children(): that de-duplicates a module used at two positions,
        # which nn.Sequential.forward runs at both.
        self.automatic = self.one_argument = True
        if isinstance(model, nn.Sequential):
            self._reference = self._sequential_reference
        layers: list[tuple[str, nn.Module]] = []
        seen: set[int] = set()
        received = self._input
        for name, mod in model._modules.items():
            if mod is None:
                continue
            layer = OneArgument(alias(mod) if id(mod) in seen else mod, received)
            seen.add(id(mod))
            received = layer._flow
            layers.append((name, layer))
        return layers

    def _sequential_reference(self, inputs: tuple[torch.Tensor, ...], single: bool) -> Any:
        return self.model(inputs[0] if single else inputs)

    def __len__(self) -> int:
        return len(self.layers)

    def note_input(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        """Record whether the chain's input is a tuple: a one-argument first layer receives a
        one-element tuple as that tuple, as ``nn.Sequential`` would pass it."""
        self._input.tuple_out = isinstance(inputs, tuple)

    @property
    def checkable(self) -> bool:
        """harmony split the model by itself and the model has a forward to compare with
        (:func:`harmony.model.probe.check_chain`)."""
        return self.automatic and self._reference is not None

    def reference(self, inputs: tuple[torch.Tensor, ...], single: bool) -> Any:
        """What the model itself computes from ``inputs`` (the chain's input as a tuple;
        ``single``: it is one tensor): ``model(x)`` for an ``nn.Sequential``, the logits of
        a Hugging Face model. None when there is nothing to compare with: a chain declared
        by ``harmony_chain()`` (the model's forward may differ on purpose) or a list."""
        if self._reference is None:
            return None
        return self._reference(inputs, single)

    def probe_inputs(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A small slice of a micro-batch to compare the chain with the model on: its first
        two samples (a Hugging Face model's first 32 tokens of them too)."""
        if self._probe_slice is not None:
            return self._probe_slice(inputs)
        return tuple(t[:2] for t in inputs)


def as_tuple(value: object, where: str) -> tuple[torch.Tensor, ...]:
    """Normalise a layer boundary value to a tuple of tensors; raise naming ``where`` if not."""
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where} gave a {type(v).__name__}; values passed between layers "
                            "must be tensors or tuples of tensors")
    return items  # type: ignore[return-value]


def call(layer: nn.Module, value: tuple[torch.Tensor, ...]) -> object:
    """Call a layer with a boundary value (a tuple is spread over positional arguments; a
    one-argument layer, :class:`OneArgument`, packs them back as ``nn.Sequential`` passes
    them)."""
    return layer(*value)


def checked_loss(loss_fn: Callable[..., torch.Tensor], output: object,
                 target: torch.Tensor) -> torch.Tensor:
    """``loss_fn(output, target)``, refusing anything but a scalar tensor."""
    loss = loss_fn(output, target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:  # (shape [1] too: not a scalar)
        raise ValueError(f"loss_fn returned {type(loss).__name__} of shape "
                         f"{tuple(getattr(loss, 'shape', ()))}; it must return a scalar tensor "
                         "of shape () (the mean loss of the micro-batch), e.g. loss.mean() or "
                         "loss.squeeze()")
    return loss
