"""Mixed precision: which dtype each tensor computes in, and fp16's dynamic loss scaling.

``Trainer(precision="bf16" | "fp16")`` trains with

- **W in the compute dtype**: every trainable floating-point fp32 parameter is held, moved and
  computed with in bf16/fp16; its flat weight buffer (what a pack's home keeps, what crosses the
  host link, what the device holds) is half the fp32 size. The exceptions are the parameters of
  normalisation layers (``LayerNorm``, ``GroupNorm``, batch norms, ``RMSNorm`` and any module
  whose class name contains "Norm"): they are few bytes and stay fp32, as apex's O2
  ``keep_batchnorm_fp32`` does. Buffers, frozen parameters and non-float tensors keep their
  dtypes.
- **compute under** ``torch.autocast(device_type, dtype)``: matmuls and convolutions run in the
  low dtype; the ops autocast keeps in fp32 (losses, softmax and friends) stay there; a norm
  layer's op runs on its low-precision input with fp32 weights (on CPU, LayerNorm accumulates
  in fp32 and returns the input's dtype, exactly as under autocast with fp32 parameters).
- **G in fp32**: each micro-batch's gradient arrives in the compute dtype and is added into an
  fp32 gradient buffer (a hook on each parameter), as ``torch.autocast`` with fp32 parameters and
  DeepSpeed's bf16 optimizer with fp32 gradient accumulation do. Accumulating in bf16 instead
  would halve G but round the running sum to 8 significant bits at every micro-batch, an error
  that grows with the number of micro-batches; harmony does not do that.
- **K = fp32 master weights + fp32 optimizer state**, wherever K lives (device, host or NVMe).
  The optimizer steps the masters; the pack's W at its home is then refreshed from them.
  ``Trainer.state_dict()``, ``save()`` and ``export()`` give the masters, in fp32.
- **fp16 only**: the loss is multiplied by a dynamic scale before backward; before the first
  update of a step every gradient is unscaled and checked; a step with an infinite or NaN
  gradient changes no weight, lowers the scale and is counted in ``stats.skipped_steps``; after
  ``growth_interval`` good steps in a row the scale grows. Updates then run after the whole
  backward (as with clipping), since the check needs every gradient.

>>> Precision.parse("bf16").compute_dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CHOICES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                                       nn.modules.batchnorm._NormBase, nn.RMSNorm)


class GradientOverflow(RuntimeError):
    """Some gradient of this step is infinite or NaN after loss scaling; no weight changed."""


@dataclass
class Precision:
    """A precision setting: ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"`` (with loss scaling).

    Args:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        init_scale, growth_factor, backoff_factor, growth_interval: fp16's dynamic loss scale
            (torch.amp.GradScaler's defaults): the loss is multiplied by ``scale``; a step whose
            gradients overflow multiplies it by ``backoff_factor``; ``growth_interval`` good
            steps in a row multiply it by ``growth_factor``.

    Raises:
        ValueError: an unknown name or a bad scaling setting, naming the value and the choices.

    Example::

        harmony.Trainer(model, loss_fn, precision=Precision("fp16", growth_interval=1000))
    """

    name: str = "fp32"
    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    scale: float = field(init=False)
    good_steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in CHOICES:
            raise ValueError(f"precision={self.name!r} is not supported; use one of "
                             f"{', '.join(repr(c) for c in CHOICES)}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale={self.init_scale!r} must be a positive finite number")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor={self.growth_factor!r} must be > 1")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={self.backoff_factor!r} must be in (0, 1)")
        if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            raise ValueError(f"growth_interval={self.growth_interval!r} must be an int >= 1")
        self.scale = float(self.init_scale) if self.scaling else 1.0

    @staticmethod
    def parse(value: str | Precision) -> Precision:
        """A new :class:`Precision` from a name, or from an instance's settings (a fresh copy,
        so trainers never share a loss scale).

        Raises:
            ValueError: an unknown name, listing the choices.
        """
        if isinstance(value, Precision):
            return dataclasses.replace(value)
        return Precision(value)

    @property
    def compute_dtype(self) -> torch.dtype:
        return CHOICES[self.name]

    @property
    def mixed(self) -> bool:
        """Weights compute in a dtype other than fp32 (with fp32 masters in K)."""
        return self.name != "fp32"

    @property
    def scaling(self) -> bool:
        """The loss is scaled (fp16)."""
        return self.name == "fp16"

    def k_ratio(self, state_ratio: float) -> float:
        """K bytes per (fp32) G byte: the optimizer's ``state_ratio``, plus 1 for the fp32
        masters in mixed precision (G is fp32 there, so the masters take G's bytes)."""
        return state_ratio + (1.0 if self.mixed else 0.0)

    def dtype_of(self, module: nn.Module, name: str, tensor: torch.Tensor,
                 trainable: bool) -> torch.dtype:
        """The dtype an entry is held in, in a pack's flat weight buffer (W)."""
        if (not self.mixed or not trainable or tensor.dtype != torch.float32
                or is_norm(module)):
            return tensor.dtype
        return self.compute_dtype

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The context compute runs in: autocast to the compute dtype (fp32: nothing)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def check_device(self, device: torch.device) -> None:
        """Refuse a compute dtype ``device`` cannot train in (a tiny autocast probe).

        Raises:
            ValueError: naming the precision, the device and what to use instead.
        """
        if not self.mixed:
            return
        try:
            if device.type == "cuda" and self.name == "bf16" \
                    and not torch.cuda.is_bf16_supported():
                raise RuntimeError("this GPU has no bf16 support")
            w = torch.ones(2, 2, device=device, requires_grad=True)  # (no RNG is drawn)
            with self.autocast(device):
                out = nn.functional.linear(torch.ones(1, 2, device=device), w).float().sum()
            out.backward()
        except RuntimeError as err:
            raise ValueError(f"precision={self.name!r} is not supported on {device} by this "
                             f"torch ({err}); use precision='fp32'"
                             f"{' or bf16' if self.name == 'fp16' else ''}") from err

    # -- fp16's loss scale ----------------------------------------------------------------
    def update_scale(self, overflow: bool) -> None:
        """After a step: back off on an overflow, grow after ``growth_interval`` good steps."""
        if not self.scaling:
            return
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The loss-scaling state, as JSON data (saved with checkpoints)."""
        return {"precision": self.name, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`. A checkpoint of another precision (or of none, from an
        older version) leaves the scale as it is: its weights are fp32 masters either way."""
        if state is None or state.get("precision") != self.name:
            return
        if self.scaling:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer, whose parameters stay fp32 under mixed precision."""
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def unscale_(grads: list[torch.Tensor], scale: float) -> bool:
    """Divide ``grads`` by ``scale`` in place; returns whether any is infinite or NaN."""
    if not grads:
        return False
    overflow = False
    for device in {g.device for g in grads}:
        group = [g for g in grads if g.device == device]
        torch._foreach_mul_(group, 1.0 / scale)
        norms = torch._foreach_norm(group, float("inf"))
        overflow |= not bool(torch.isfinite(torch.stack(norms)).all())
    return overflow

