"""What runs before a step's first update: the loss checked, fp16 gradients unscaled, the
global gradient norm clipped (called by :class:`harmony.runtime.updates.UpdatePath`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harmony.model.precision import GradientOverflow, unscale_


class NonFiniteLoss(ValueError):
    """The batch's loss is NaN or infinite; raised before any pack is updated."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"step {step}: the loss is {loss}; no weight was changed. Lower the "
                         "learning rate or check the data, or pass nonfinite='skip' to skip "
                         "such steps")


def unscale(grads: list[torch.Tensor], scale: float,
            all_sum: Callable[[float], float] | None, step: int) -> None:
    """fp16: divide every gradient by the loss scale; raise if any overflowed.

    Args:
        grads: the gradients (of this rank's packs, with a sharded optimizer).
        scale: the loss scale. all_sum: sums a number over the ranks (sharded optimizer:
            each rank checked its packs), else None. step: the step (for the message).

    Raises:
        GradientOverflow: a gradient is infinite or NaN after unscaling (nothing is updated).
    """
    overflow = unscale_(grads, scale)
    if all_sum is not None:
        overflow = all_sum(float(overflow)) > 0
    if overflow:
        raise GradientOverflow(f"step {step}: a gradient overflowed at loss scale "
                               f"{scale:g}; the step is skipped")


def clip(views: dict[int, list[torch.Tensor | None]], order: Sequence[tuple[int, int]],
         max_norm: float, all_sum: Callable[[float], float] | None) -> float | None:
    """Scale every gradient as ``clip_grad_norm_`` over the whole model would; returns the
    global norm (None: no gradient, nothing done).

    Args:
        views: per pack (of this rank's, with a sharded optimizer), its gradients.
        order: (pack, trainable index) of every gradient in the model's parameter order, in
            which the norm is summed (so it rounds as ``clip_grad_norm_`` does).
        max_norm: the largest norm kept. all_sum: sums a number over the ranks (sharded
            optimizer: each rank holds the summed gradients of its own packs), else None.

    The schedule runs every update after the last backward, so all gradients exist here.
    """
    grads = [g for p, i in order if p in views and (g := views[p][i]) is not None]
    if all_sum is not None:
        # Sharded optimizer: the squares of the ranks' norms are summed (float64) into the
        # global norm.
        square = sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in grads)
        total = torch.tensor(all_sum(square) ** 0.5, dtype=torch.float32)
    elif not grads:
        return None
    else:
        total = torch.nn.utils.get_total_norm(grads, 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for device in {g.device for g in grads}:
        torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))
    return float(total)
