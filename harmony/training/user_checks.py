"""Checks of what a user hands a :class:`harmony.Trainer`: the optimizer factory, the
learning-rate scheduler factory and the model's tensors. Each refuses a mistake with a message
naming the value and the correct form, before it can change any weight.

Example::

    factory = checked_optimizer_factory(lambda params: torch.optim.AdamW(params, lr=1e-3))
    opt = factory(params)            # ValueError if the optimizer holds other parameters
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["check_lr_scheduler", "check_lr_scheduler_factory", "check_optimizer_factory",
           "checked_optimizer_factory", "refuse_meta_tensors"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _public_name(cls: type) -> str:
    """``torch.optim.AdamW`` rather than ``torch.optim.adamw.AdamW`` where torch exports it."""
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _factory_form(cls: type | None = None, lr: object = "...") -> str:
    name = _public_name(cls) if cls is not None else "torch.optim.AdamW"
    return f"optimizer=lambda params: {name}(params, lr={lr})"


def check_optimizer_factory(optimizer: object) -> None:
    """Refuse an optimizer instance (or anything not callable) given as ``optimizer=``.

    Raises:
        ValueError: naming the value and showing the factory form.
    """
    if optimizer is None:
        return
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        lr = optimizer.param_groups[0].get("lr", "...") if optimizer.param_groups else "..."
        raise ValueError(
            f"optimizer={cls.__name__}(...) is an optimizer, not a factory: harmony builds one "
            f"optimizer per pack of layers, over that pack's parameters (wherever they live), "
            f"so it needs a function of the parameters; pass {_factory_form(cls, lr)}")
    if not callable(optimizer):
        raise ValueError(f"optimizer={optimizer!r} is not callable; pass a factory such as "
                         f"{_factory_form(None, '1e-3')}")


def checked_optimizer_factory(factory: OptimizerFactory) -> OptimizerFactory:
    """``factory``, refusing an optimizer that is not one or that does not hold exactly the
    parameters it was given (a factory that ignores its argument would train other tensors
    than harmony's, silently).

    Raises (when called):
        TypeError: the factory returned no ``torch.optim.Optimizer``.
        ValueError: its optimizer holds other parameters than those given, with the form to
            use instead.
    """
    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}; it must return "
                            "a torch.optim.Optimizer built over the parameters it is given, "
                            f"e.g. {_factory_form(None, '1e-3')}")
        held = [p for group in opt.param_groups for p in group["params"]]
        given = {id(p) for p in params}
        if len(held) != len(params) or {id(p) for p in held} != given:
            foreign = sum(id(p) not in given for p in held)
            missing = len(given - {id(p) for p in held})
            lr = opt.param_groups[0].get("lr", "...") if opt.param_groups else "..."
            raise ValueError(
                f"the optimizer factory's {type(opt).__name__} holds other parameters than the "
                f"{len(params)} it was given ({foreign} of its {len(held)} were not given, "
                f"{missing} given are missing): harmony calls the factory once per pack with "
                f"that pack's parameters, and an optimizer over any others trains the wrong "
                f"tensors; build it over its argument: {_factory_form(type(opt), lr)}")
        return opt

    build.__wrapped__ = factory  # type: ignore[attr-defined]
    return build


def check_lr_scheduler_factory(lr_scheduler: object) -> None:
    """Refuse a scheduler instance (or anything not callable) given as ``lr_scheduler=``.

    Raises:
        ValueError: naming the value and showing the factory form.
    """
    if lr_scheduler is None:
        return
    if not callable(lr_scheduler) or hasattr(lr_scheduler, "optimizer"):
        raise ValueError(
            f"lr_scheduler={type(lr_scheduler).__name__}(...) is not a factory: harmony builds "
            "one scheduler per pack's optimizer; pass a function of the optimizer, e.g. "
            "lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100)")


def check_lr_scheduler(scheduler: object, factory: object) -> None:
    """Refuse what an ``lr_scheduler`` factory returned unless harmony can step it after
    every step and save it: it has ``step()``, ``state_dict()`` and ``load_state_dict()``,
    and its ``step()`` needs no metric (``ReduceLROnPlateau`` does: refused).

    Raises:
        ValueError: naming what was returned and what to use instead.
    """
    form = "e.g. lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100)"
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "lr_scheduler returned ReduceLROnPlateau, which steps on a metric "
            "(scheduler.step(val_loss)); harmony steps its schedulers after every optimizer "
            "step, without one. Use a schedule of the step count (StepLR, LambdaLR, "
            f"CosineAnnealingLR, OneCycleLR, ...), {form}")
    missing = [m for m in ("step", "state_dict", "load_state_dict")
               if not callable(getattr(scheduler, m, None))]
    if missing:
        what = "None" if scheduler is None else type(scheduler).__name__
        raise ValueError(
            f"lr_scheduler={factory!r} returned {what}, which has no "
            f"{', '.join(m + '()' for m in missing)}; the factory must return a learning-rate "
            f"scheduler over the optimizer it is given, {form}")


def refuse_meta_tensors(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Refuse a model whose parameters or buffers are on the meta device (shapes without
    values): nothing could be trained from them.

    Raises:
        ValueError: naming some of them and the arguments that give them values.
    """
    named: list[tuple[str, Any]] = list(model.named_parameters()) + list(model.named_buffers())
    seen = {id(t) for _, t in named}
    for i, layer in enumerate(layers):  # (a list of layers has no root of the user's)
        named += [(f"layer {i}: {n}", t) for n, t in layer.named_parameters()
                  if id(t) not in seen]
    meta = [n for n, t in named if t is not None and t.is_meta]
    if meta:
        raise ValueError(
            f"the model's {', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''} "
            f"({len(meta)} tensors) are on the meta device: they have shapes but no values "
            "to train. Build the model on the CPU, or give the values: "
            "Trainer(..., init=fn) to initialize each layer as it is placed, or "
            "Trainer(..., weights=PATH) to load them from safetensors or a checkpoint")
