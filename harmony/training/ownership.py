"""Who holds a user's model: a :class:`harmony.Trainer`, from its construction to its close.

While a trainer holds a model, the model's parameters are the trainer's: they are bound to its
buffers, or to empty tensors while their pack is away, and its optimizers step copies of them.
Running the model or reading its ``state_dict()`` then would compute with the wrong tensors
(torch would say ``mat2 must be a matrix``). So a :class:`Hold` marks the model and its layers:
calling any of them, or ``state_dict()`` / ``load_state_dict()`` on the model, outside the
trainer's own methods (:func:`acting`) raises :class:`ModelHeldError` saying which trainer
holds it and what to call instead; and a second trainer on a held model (or on one of its
layers) is refused at construction. When the trainer gives the model back (``close()``) the
marks go; if it could not give the weights back, the marks stay and say why.

Example::

    hold = Hold(model, layers)       # model(x) now raises ModelHeldError
    with acting():
        model(x)                     # harmony's own code runs it
    hold.release()                   # the user's again
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from harmony.model.chain import OneArgument

__all__ = ["Hold", "ModelHeldError", "acting", "check_free"]

_local = threading.local()
# Module -> the hold on it (weak keys: a model the user dropped is forgotten).
_HELD: weakref.WeakKeyDictionary[nn.Module, Hold] = weakref.WeakKeyDictionary()

HELD = ("this model is held by a harmony.Trainer: while it trains, the model's parameters "
        "are the trainer's (in its buffers, or empty while their layers are swapped out). "
        "Use trainer.state_dict() for the weights, trainer.save(dir) or trainer.export(dir) "
        "to write them, or trainer.close() / trainer.release_model() to get the model back "
        "with the trained weights")


class ModelHeldError(RuntimeError):
    """A held model was called or read outside its trainer; the message says what to call."""


@contextlib.contextmanager
def acting() -> Iterator[None]:
    """Run the body as harmony's own code: held models may be called and read in it (on
    this thread)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def acts(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a trainer method that runs or reads the model it holds (:func:`acting`)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with acting():
            return method(*args, **kwargs)

    wrapper.__name__, wrapper.__qualname__ = method.__name__, method.__qualname__
    wrapper.__doc__, wrapper.__wrapped__ = method.__doc__, method  # type: ignore[attr-defined]
    return wrapper


def _modules(model: nn.Module, layers: Sequence[nn.Module]) -> list[nn.Module]:
    """The model, its chain's layers and, for a layer that adapts a user's module to the
    chain (an ``nn.Sequential`` entry), that module: what the user may call."""
    seen: dict[int, nn.Module] = {}
    for m in (model, *layers):
        seen.setdefault(id(m), m)
        if isinstance(m, OneArgument):
            seen.setdefault(id(m.module), m.module)
    return list(seen.values())


def check_free(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Refuse a model (or layers) another live trainer holds.

    Raises:
        ValueError: naming the module and what to do (close the other trainer first).
    """
    for m in _modules(model, layers):
        hold = _HELD.get(m)
        if hold is None:
            continue
        what = "the model" if m is model else f"its layer {type(m).__name__}"
        if hold.kept:
            raise ValueError(f"{what} has no weights: {hold.message}")
        raise ValueError(f"{what} is held by another harmony.Trainer, which trains it; "
                         "close() that trainer first (or take the model back with its "
                         "release_model()), then build the new one")


class Hold:
    """A trainer's mark on a model and its layers (see the module docstring).

    Args:
        model: the user's model (its ``state_dict``/``load_state_dict`` are guarded too).
        layers: the chain's layers (each guarded against calls).

    Raises:
        ValueError: another trainer holds the model or one of its layers.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module]) -> None:
        check_free(model, layers)
        self.message = HELD
        self.kept = False  # closed without giving the weights back
        modules = _modules(model, layers)
        self._handles: list[RemovableHandle] = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._refuse))
        self._handles.append(model.register_state_dict_pre_hook(self._refuse))
        self._handles.append(model.register_load_state_dict_pre_hook(self._refuse))
        self._modules = [weakref.ref(m) for m in modules]
        for m in modules:
            _HELD[m] = self

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        if getattr(_local, "depth", 0) == 0:
            raise ModelHeldError(self.message)

    def release(self) -> None:
        """The model is the user's again: remove every mark."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ref in self._modules:
            m = ref()
            if m is not None and _HELD.get(m) is self:
                del _HELD[m]

    def keep(self, why: str) -> None:
        """The trainer closed without giving the weights back: touching the model (or a new
        trainer on it) raises with ``why``, which says what happened and what to do."""
        self.message = why
        self.kept = True
