"""A batch as one step sees it: split into micro-batches, each micro-batch's loss weighted by
its share of the samples, and the shape its plans are kept by.

Example::

    batch = StepBatch.split(torch.zeros(10, 3), torch.zeros(10), 4)
    batch.sizes                 # [4, 4, 2]
    batch.key                   # ((4, 4, 2), ((3,), torch.float32))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harmony.planning.microbatch import split_batch

__all__ = ["StepBatch"]


@dataclass(frozen=True)
class StepBatch:
    """One step's micro-batches.

    Attributes:
        inputs: per micro-batch, the first layer's input tensors.
        targets: per micro-batch, the targets.
        weights: per micro-batch, its samples over the batch's (the loss weights).
        single: the input was one tensor, not a tuple.
    """

    inputs: list[tuple[torch.Tensor, ...]]
    targets: list[torch.Tensor]
    weights: list[float]
    single: bool

    @classmethod
    def split(cls, inputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
              micro_batch_size: int) -> StepBatch:
        """``inputs`` and ``targets`` split into micro-batches of ``micro_batch_size``.

        Raises:
            ValueError: an empty batch, mismatched batch sizes or non-tensor inputs, naming
                them.
        """
        return cls(*split_batch(inputs, targets, micro_batch_size))

    def check_device(self, device: torch.device) -> None:
        """Refuse tensors on another device than the CPU or ``device``.

        Raises:
            ValueError: naming the tensors, their device and what to pass instead.
        """
        for name, t in [("inputs", x) for x in self.inputs[0]] + [("targets", self.targets[0])]:
            if t.device.type != "cpu" and t.device != device:
                raise ValueError(f"{name} are on {t.device}, but this trainer computes on "
                                 f"{device}; pass CPU tensors (harmony moves each "
                                 f"micro-batch) or tensors on {device}")

    @property
    def sizes(self) -> list[int]:
        """Samples per micro-batch."""
        return [x[0].shape[0] for x in self.inputs]

    @property
    def key(self) -> tuple[object, ...]:
        """The shape plans are kept by: the micro-batch sizes, then per input tensor its
        per-sample shape and dtype."""
        return (tuple(self.sizes),) + tuple(
            (tuple(t.shape[1:]), t.dtype) for t in self.inputs[0])

    @property
    def second(self) -> tuple[torch.Tensor, ...] | None:
        """The second micro-batch's inputs (a profile checks forward groups on it)."""
        return self.inputs[1] if len(self.inputs) > 1 else None
