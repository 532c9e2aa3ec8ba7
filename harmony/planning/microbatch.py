"""Micro-batch streaming: split a batch, and weight each micro-batch's loss by its share."""

from __future__ import annotations

import torch


def micro_batch_sizes(batch_size: int, micro_batch_size: int) -> list[int]:
    """The sizes ``torch.split`` cuts a batch into: ``(10, 4) -> [4, 4, 2]``."""
    for name, v in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    sizes = [micro_batch_size] * (batch_size // micro_batch_size)
    return sizes + ([batch_size % micro_batch_size] if batch_size % micro_batch_size else [])


def split_batch(inputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
                micro_batch_size: int,
                ) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor], list[float], bool]:
    """Split a batch into micro-batches of ``micro_batch_size`` (the last may be smaller).

    Returns:
        (inputs per micro-batch as tuples, targets per micro-batch, loss weight per micro-batch
        (samples / batch size, so that the weighted sum of mean losses is the batch mean), and
        whether the input was a single tensor rather than a tuple).

    Raises:
        ValueError: empty batch, mismatched batch sizes, or non-tensor inputs, naming them.

    >>> xs, ys, w, single = split_batch(torch.zeros(5, 2), torch.zeros(5), 2)
    >>> [x[0].shape[0] for x in xs], w
    ([2, 2, 1], [0.4, 0.4, 0.2])
    """
    single = isinstance(inputs, torch.Tensor)
    items: tuple[torch.Tensor, ...] = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if not isinstance(items, tuple) or not items or not all(
            isinstance(t, torch.Tensor) for t in items):
        raise ValueError(f"inputs must be a tensor or a tuple of tensors, got "
                         f"{type(inputs).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    n = targets.shape[0] if targets.dim() else 0
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"inputs[{i}] has batch size {t.shape[0] if t.dim() else 'none'} "
                             f"but targets has {n}; both must have the batch along dim 0")
    if n == 0:
        raise ValueError("the batch is empty (batch size 0)")
    parts = [t.split(micro_batch_size) for t in items]
    micro_inputs = [tuple(p[m].contiguous() for p in parts) for m in range(len(parts[0]))]
    micro_targets = [t.contiguous() for t in targets.split(micro_batch_size)]
    weights = [x[0].shape[0] / n for x in micro_inputs]
    return micro_inputs, micro_targets, weights, single
