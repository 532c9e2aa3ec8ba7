"""Turning a model into a chain of layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from harmony.hf import hf_chain_method


class Chain:
    """The layers of a model in the order data flows through them.

    Args:
        model: an ``nn.Sequential``; a list or ``nn.ModuleList`` of modules; or any module with
            a ``harmony_chain()`` method returning its layers in order (modules, or
            ``(name, module)`` pairs). Each layer is called with the previous one's output
            (a tensor, or a tuple of tensors passed as positional arguments).

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
        declared = getattr(model, "harmony_chain", None)
        declared = declared if callable(declared) else hf_chain_method(model)
        layers: list[tuple[str, nn.Module]]
        if callable(declared):
            items = list(declared())
            names = {id(m): n for n, m in model.named_modules()}
            layers = []
            for i, item in enumerate(items):
                name, mod = item if isinstance(item, tuple) else (names.get(id(item), str(i)), item)
                if not isinstance(mod, nn.Module):
                    raise ValueError(f"{type(model).__name__}.harmony_chain() item {i} is a "
                                     f"{type(mod).__name__}, not an nn.Module")
                layers.append((name, mod))
        elif isinstance(model, (nn.Sequential, nn.ModuleList)):
            layers = list(model.named_children())
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

    def __len__(self) -> int:
        return len(self.layers)


def as_tuple(value: object, where: str) -> tuple[torch.Tensor, ...]:
    """Normalise a layer boundary value to a tuple of tensors; raise naming ``where`` if not."""
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where} gave a {type(v).__name__}; values passed between layers "
                            "must be tensors or tuples of tensors")
    return items  # type: ignore[return-value]


def call(layer: nn.Module, value: tuple[torch.Tensor, ...]) -> object:
    """Call a layer with a boundary value (a tuple is spread over positional arguments)."""
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
