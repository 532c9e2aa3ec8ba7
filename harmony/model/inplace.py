"""Layers that change their input in place, such as ``nn.ReLU(inplace=True)`` as a layer of
its own, or a block whose forward begins with ``x.mul_(...)``.

Plain PyTorch runs them as one graph, where a layer's input is the previous layer's output (a
non-leaf tensor autograd may see changed). harmony runs each pack on an input it stashed: a
forward without grad would change the stash (the next micro-batch's recompute would read the
changed values), and in backward the input is a leaf that requires grad, which autograd
refuses to see changed ("a leaf Variable that requires grad is being used in an in-place
operation"). So such a layer gets a private copy of each input tensor it changes: a forward
pre-hook (:class:`InputCopies`) passes it clones, and it computes exactly what plain PyTorch
computes. Which layers and inputs need one is found by running the layer once, without grad,
on clones of a real input and watching the tensors' version counters
(:func:`changed_inputs`); the profiler does so for every layer.

Example::

    copies = InputCopies()
    if idx := changed_inputs(layer, value):
        copies.add(layer, idx)       # layer(*value) now leaves value as it was
    copies.remove()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from harmony.model.chain import call

__all__ = ["InputCopies", "changed_inputs"]


def changed_inputs(layer: nn.Module, value: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """Positions of the tensors of ``value`` that ``layer``'s forward changes in place.

    Runs the forward once without grad on clones of ``value`` (which is left as it was), under
    a forked random-number generator (a dropout draws nothing from the caller's)."""
    clones = tuple(t.clone() for t in value)
    versions = [t._version for t in clones]
    devices = [t.device for t in value if t.device.type == "cuda"]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        call(layer, clones)
    return tuple(i for i, (t, v) in enumerate(zip(clones, versions)) if t._version != v)


class InputCopies:
    """Forward pre-hooks that give layers private copies of the inputs they change in place;
    :meth:`remove` takes them all off again (the user's modules are left as they came)."""

    def __init__(self) -> None:
        self._hooks: dict[int, RemovableHandle] = {}

    def __contains__(self, layer: nn.Module) -> bool:
        return id(layer) in self._hooks

    def add(self, layer: nn.Module, positions: tuple[int, ...]) -> None:
        """From now on ``layer`` receives clones of its inputs at ``positions``."""
        if id(layer) in self._hooks:
            return
        wanted = frozenset(positions)

        def copy_inputs(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(a.clone() if i in wanted and isinstance(a, torch.Tensor) else a
                         for i, a in enumerate(args))

        self._hooks[id(layer)] = layer.register_forward_pre_hook(copy_inputs)

    def remove(self) -> None:
        """Take every hook off."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
