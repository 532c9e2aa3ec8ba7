"""A trainer's hold on its user's model, and giving the model back.

A trainer holds its model (:mod:`harmony.training.ownership`) from construction and gives it
back on ``close()``, its parameters holding the trained values on the devices they came from.
It cannot when the weights are no longer those of one step, live partly on other ranks, or
exceed the budgets the model's own devices were given; :func:`why_not_given_back` says which,
in words the user then sees (a warning, and the error touching the model raises). A trainer
dropped without ``close()`` lets go of a model it never took the weights of
(:class:`Handback`'s finalizer).

Example::

    handback = Handback(trainer, chain, copies)     # model(x) now raises ModelHeldError
    why = why_not_given_back(built, broken, pipeline, origin, host_memory, device_memory)
    handback.finish(why)                            # the user's again (or kept, saying why)
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from harmony.training.ownership import Hold
from swap.tier import fmt_bytes

if TYPE_CHECKING:
    from harmony.model.chain import Chain
    from harmony.model.inplace import InputCopies
    from harmony.parallel.pipeline import Pipeline
    from harmony.training.built import Built

__all__ = ["Handback", "dropped", "refuse_if_closed", "why_not_given_back"]


class Handback:
    """A trainer's hold on its model (see the module docstring).

    Args:
        owner: the trainer (when it is garbage-collected without ``close()``, the finalizer
            lets go of the model, or keeps it marked if the packs held its weights).
        chain: the model's chain. copies: the private copies of inputs layers change.

    Attributes:
        hold: the marks on the model and its layers.
        built: ``built[0]``: whether packs hold the weights now (the finalizer reads it).

    Raises:
        ValueError: another trainer holds the model.
    """

    def __init__(self, owner: object, chain: Chain, copies: InputCopies) -> None:
        self.hold = Hold(chain.model, chain.layers)
        self.built = [False]
        self._copies = copies
        self._on_drop = weakref.finalize(owner, dropped, self.hold, self.built, copies)

    def finish(self, why_not: str | None) -> None:
        """The trainer closed: the model is the user's again, or, if ``why_not`` says why
        the weights were not given back, stays marked with those words."""
        self._on_drop.detach()
        self._copies.remove()
        if why_not is None:
            self.hold.release()
        else:
            self.hold.keep(f"this model's harmony.Trainer was closed: {why_not}")


def why_not_given_back(built: Built | None, broken: str | None, pipeline: Pipeline | None,
                       origin: dict[int, tuple[torch.device, int]], host_memory: int | None,
                       device_memory: int | None) -> str | None:
    """Why closing would not give the model its trained weights (None: it will).

    Args:
        built: what the trainer built under its plan (None: nothing; the model holds its own
            tensors still).
        broken: why the weights are no longer those of one step, if they are not.
        pipeline: this rank's pipeline stage, if any.
        origin: per tensor, the device it came from and its bytes.
        host_memory, device_memory: the budgets the weights must fit to be given back.
    """
    if built is None:  # never built: the model holds its own tensors still
        return None
    if broken is not None:
        return (f"{broken}. Such weights are not given back to the model; load "
                "the last checkpoint into a new Trainer, or take them with "
                "state_dict(inconsistent_ok=True) before close()")
    if pipeline is not None:
        return ("with parallel='pipeline' each rank holds only its stage's weights, so "
                "they are not given back to the model; call trainer.state_dict() on every "
                "rank, or save() / export(), before close()")
    if any(not p.owned and p.layout.mixed for p in built.packs):
        return ("with shard_optimizer=True in mixed precision another rank keeps some "
                "packs' fp32 masters, so the weights are not given back to the model; call "
                "trainer.state_dict() on every rank, or save() / export(), before close()")
    need: dict[str, int] = {}
    for device, nbytes in origin.values():
        kind = "host" if device.type in ("cpu", "meta") else "device"
        need[kind] = need.get(kind, 0) + nbytes
    for kind, budget in (("host", host_memory), ("device", device_memory)):
        if budget is not None and need.get(kind, 0) > budget:
            return (f"the trained weights ({fmt_bytes(need[kind])}) exceed "
                    f"{kind}_memory={fmt_bytes(budget)}, so they are not given back to "
                    "the model; call trainer.export(dir) (safetensors the model loads) "
                    "or trainer.save(dir) before close() and load them from there")
    return None


def dropped(hold: Hold, built: list[bool], copies: InputCopies) -> None:
    """A trainer was garbage-collected (or the interpreter ends) without close(); ``built[0]``
    says whether its packs held the weights."""
    copies.remove()
    if not built[0]:
        hold.release()
    elif not hold.kept:
        hold.keep("its harmony.Trainer was deleted without close(), and the trained weights "
                  "went with it; close() a trainer (or use `with harmony.Trainer(...)`) to "
                  "get the model back, or save() first")


def refuse_if_closed(what: str, hold: Hold, model_readable: bool = False) -> None:
    """Refuse ``what`` on a closed trainer, whose buffers and files are freed: nothing of the
    training state is left to write or train. A read of the weights alone
    (``model_readable``) passes where the model was given them back: the caller reads them
    from the model.

    Raises:
        RuntimeError: naming ``what`` and where the weights are.

    Example::

        refuse_if_closed("save()", handback.hold)   # raises: the optimizer state is gone
    """
    if hold.kept:
        where = f"the weights were not given back to the model: {hold.message}"
    elif model_readable:
        return
    else:
        where = ("the model it gave back holds the trained weights (model.state_dict()); to "
                 "train on, make a new Trainer of the model (load() a checkpoint into it for "
                 "the optimizer state)")
    raise RuntimeError(f"{what} refused: this Trainer is closed, so its training state is "
                       f"freed; {where}")
