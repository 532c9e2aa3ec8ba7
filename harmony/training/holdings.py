"""What a trainer holds from its construction to its close.

A :class:`harmony.Trainer` is composed of owners: its planner
(:mod:`harmony.training.planner`), what lives under the current plan
(:mod:`harmony.training.built`) and its state I/O (:mod:`harmony.training.state_io`). They all
read the same surroundings, made once at construction: the model's chain and where its layers'
values come from, the compute device and precision, the tiers with their budgets, the NVMe
store, the swap engine, the process groups. :class:`Holdings` hands those to each owner as one
value. The references never change; each object keeps its own state (a tier its bytes, the
precision its loss scale, the engine its copies) behind its own interface.

Example::

    holdings = Holdings(chain, materializer, device, precision, stats, tiers, store, engine,
                        dp=None, pipeline=None, copies=InputCopies(), first_key={})
    holdings.model_tensors()      # the model's state_dict(keep_vars=True), read as its trainer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harmony.training.ownership import acting

if TYPE_CHECKING:
    from harmony.model.chain import Chain
    from harmony.model.inplace import InputCopies
    from harmony.model.materialize import Materializer
    from harmony.model.precision import Precision
    from harmony.parallel.data_parallel import DataParallel
    from harmony.parallel.pipeline import Pipeline
    from harmony.runtime.pack import Pack
    from schedules.task import Loc
    from swap.engine import SwapEngine
    from swap.nvme import NvmeStore
    from swap.stats import Stats
    from swap.tier import Tier

__all__ = ["Holdings", "model_tensors"]


def model_tensors(chain: Chain) -> dict[str, torch.Tensor]:
    """The model's ``state_dict(keep_vars=True)``, read as the trainer holding it."""
    with acting():
        return chain.model.state_dict(keep_vars=True)


@dataclass(frozen=True)
class Holdings:
    """A trainer's fixed surroundings (see the module docstring).

    Attributes:
        chain: the model's chain of layers.
        materializer: where the layers' values come from before the packs hold them (a model
            on the meta device, ``init=``, ``weights=``).
        device: the compute device. precision: the trainer's own Precision (fp16's loss
            scale lives in it). stats: the trainer's counters.
        tiers: the device and host tiers (and the NVMe tier's accounting), with the budgets.
        store: the NVMe store, or None. engine: the swap engine.
        dp: data parallelism, or None. pipeline: this rank's pipeline stage, or None.
        copies: the private copies of inputs that layers change in place.
        first_key: for a tensor under several keys of the model's state dict, its first key,
            which names its optimizer state whichever packs the plan makes.
    """

    chain: Chain
    materializer: Materializer
    device: torch.device
    precision: Precision
    stats: Stats
    tiers: dict[Loc, Tier]
    store: NvmeStore | None
    engine: SwapEngine
    dp: DataParallel | None
    pipeline: Pipeline | None
    copies: InputCopies
    first_key: dict[int, str]

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict(keep_vars=True)``, read as the trainer holding it."""
        return model_tensors(self.chain)

    def weights_arrived(self) -> None:
        """Sharded optimizer: wait for the weight broadcasts of the last step (each step's
        broadcasts are otherwise waited for by the next use of the pack's weights)."""
        if self.dp is not None:
            self.dp.finish_broadcasts()

    def close(self) -> None:
        """Free what the tiers cache, close the NVMe store (its files go) and leave the
        process groups (the swap engine is closed first, by the trainer)."""
        for tier in self.tiers.values():
            tier.clear_cache()
        if self.store is not None:
            self.store.close()
        if self.dp is not None:
            self.dp.close()
        if self.pipeline is not None:
            self.pipeline.close()

    def param_keys(self, pack: Pack) -> dict[int, str]:
        """For each of ``pack``'s optimizer parameters (its masters), the model's key that
        names its optimizer state."""
        key_of = {id(v): k for k, v in self.model_tensors().items()}
        key_of.update(self.first_key)
        return {id(m): key_of[id(e.tensor)] for m, e in zip(pack.masters, pack.layout.trainable)}
