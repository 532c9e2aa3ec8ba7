"""What the runtime is told once, at construction (:class:`RuntimeOptions`), and each step
(:class:`StepData`, the micro-batches)."""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, field

import torch

from harmony.model.precision import Precision
from harmony.model.tied import TiedWeights
from harmony.runtime.hooks import Comm, DataParallelHooks


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How a :class:`~harmony.runtime.runtime.Runtime` runs its steps (set by the trainer and,
    for a pipeline rank, by :meth:`harmony.parallel.pipeline.Pipeline.runtime_options`).

    Args:
        loss_fn: ``(output, target) -> mean loss`` of one micro-batch.
        device: the compute device.
        seed: the seed randomness derives from (:func:`harmony.model.rng.layer_rng`).
        precision: the trainer's mixed precision, whose loss scale the trainer updates after
            each step: compute runs under its autocast; fp16 scales the loss, and unscales and
            checks every gradient before the first update.
        clip: ``(max norm, (pack, trainable index) of every gradient in the model's parameter
            order)``: clip the global norm before the first update (None: no clipping).
        ties: parameters several packs use (:mod:`harmony.model.tied`; None: none).
        dp: this data-parallel rank's collectives (None: one process).
        owners: sharded optimizer: the rank owning each pack's optimizer (None: every rank
            updates every pack); a rank steps only its packs and receives the others' weights.
        comm: a pipeline rank's SEND/RECV (None: not a pipeline rank).
        input_grad: pack 0's input came from another rank, so its backward produces the input's
            gradient (``D0``) to send back.
        overlap_updates: run host- and NVMe-homed packs' optimizer steps on a worker thread,
            behind the next pack's backward (:mod:`harmony.runtime.update_worker`).
        changing: ids of the buffers a forward changes, as the profile found them (None: every
            buffer). The set is the profile's: it grows when later shapes are profiled, and the
            runtime reads it each time a pack's forward has run.
        stage_batch: copy the step's inputs and targets into host-tier buffers before the
            copies to the device read them (None: where the host tier is pinned, as on CUDA).

    Example::

        options = RuntimeOptions(loss_fn=torch.nn.functional.mse_loss,
                                 device=torch.device("cpu"), seed=0)
    """

    loss_fn: Callable[..., torch.Tensor]
    device: torch.device
    seed: int = 0
    precision: Precision = field(default_factory=Precision)
    clip: tuple[float, tuple[tuple[int, int], ...]] | None = None
    ties: TiedWeights | None = None
    dp: DataParallelHooks | None = None
    owners: tuple[int, ...] | None = None
    comm: Comm | None = None
    input_grad: bool = False
    overlap_updates: bool = False
    changing: Set[int] | None = None
    stage_batch: bool | None = None


@dataclass
class StepData:
    """One step's micro-batches: inputs and targets (on the host), and each one's loss weight."""

    inputs: list[tuple[torch.Tensor, ...]]
    targets: list[torch.Tensor]
    weights: list[float]
    single_input: bool
