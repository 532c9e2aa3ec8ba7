"""Optimizer factories for :class:`harmony.Trainer`.

A factory takes the parameters of one pack and returns an optimizer over them; the trainer calls
it once per pack. Updates whose optimizer state lives on the host run on the CPU. torch's
default AdamW is the exact reference and harmony's default. Faster, not bitwise equal (measured
with torch 2.13 on this project's CPU machine, 3 steps of 1000x1000 tensors): torch's fused AdamW
differs from it by up to 4.8e-7 absolute on weights of order 1, DeepSpeed's CPU Adam by about
3e-7 relative.

>>> make = adamw(lr=3e-4)
>>> opt = make([torch.nn.Parameter(torch.zeros(3))])
>>> type(opt).__name__
'AdamW'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from swap.aio import built_op

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def adamw(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, fused: bool = False) -> Factory:
    """torch's AdamW. ``fused=True`` takes the fused kernel: faster on the CPU, but it rounds
    differently from the default implementation (see the module docstring)."""

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                                 weight_decay=weight_decay, fused=fused or None)

    return make


def deepspeed_cpu_adam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 0.01) -> Factory:
    """DeepSpeed's CPU Adam (AdamW mode), for packs whose optimizer state lives on the host.

    It builds its C++ op on first use (a few minutes, logged when it starts; cached under
    ``TORCH_EXTENSIONS_DIR``; ``harmony env`` says whether it is built).

    Raises:
        ImportError: DeepSpeed or its CPU Adam op is unavailable; the message says how to get it
            and that :func:`adamw` is the exact alternative.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if built_op("cpu_adam") is None:  # (no silent minutes: DeepSpeed compiles it on first use)
        logging.getLogger("harmony").warning(
            "harmony: DeepSpeed's CPU Adam op is not built; the first optimizer builds it, "
            "which may take a few minutes (once: later runs load the build)")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as err:  # ImportError, or a failing accelerator probe
        raise ImportError(f"DeepSpeed's CPU Adam is unavailable ({err}); pip install deepspeed, "
                          "or use harmony.optim.adamw(), torch's exact fused AdamW") from err

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if any(p.device.type != "cpu" for p in params):
            raise ValueError("DeepSpeedCPUAdam updates parameters in CPU memory; this pack's "
                             "optimizer state lives on the device: use harmony.optim.adamw()")
        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                adamw_mode=True)

    return make
