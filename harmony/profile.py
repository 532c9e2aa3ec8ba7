"""Measuring layers: bytes of weights, boundary activations, saved activations, and time.

The profile runs each layer once on one micro-batch (on the compute device, one layer's
weights at a time, so it fits wherever training fits) and records per-sample sizes, which the
planner scales to every micro-batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from harmony.chain import Chain, as_tuple, call, checked_loss
from harmony.layout import Layout
from harmony.rng import layer_rng


@dataclass
class LayerProfile:
    """One layer's sizes (bytes) and times (seconds) at ``samples`` samples."""

    name: str
    w_bytes: int          # flat weights (parameters and buffers)
    g_bytes: int          # flat gradients of trainable parameters
    in_bytes: float       # per sample: the layer's input value
    in_grad_bytes: float  # per sample: the floating-point part of it (what its gradient takes)
    saved_bytes: float    # per sample: tensors autograd saves for backward
    out_bytes: float      # per sample: the layer's output value
    fwd_s: float          # per sample: forward without grad
    bwd_s: float          # per sample: forward with grad plus backward


def _nbytes(value: tuple[torch.Tensor, ...], floating_only: bool = False) -> int:
    return sum(t.numel() * t.element_size() for t in value
               if not floating_only or t.is_floating_point())


def profile_layers(chain: Chain, layouts: list[Layout], inputs: tuple[torch.Tensor, ...],
                   targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                   device: torch.device) -> list[LayerProfile]:
    """Run every layer once on ``inputs`` (one micro-batch) and measure it.

    Weights are moved to ``device`` one layer at a time and moved back, so the profile needs no
    more device memory than one layer. Generator states are restored afterwards.
    """
    samples = inputs[0].shape[0]
    value = tuple(t.to(device) for t in inputs)
    out: list[LayerProfile] = []
    n = len(chain)
    for i, (name, layer, layout) in enumerate(zip(chain.names, chain.layers, layouts)):
        homes = [e.tensor.data for e in layout.entries]
        for e in layout.entries:
            e.tensor.data = e.tensor.data.to(device)
        try:
            with layer_rng(0, 0, 0, i, device):
                t0 = time.perf_counter()
                with torch.no_grad():
                    result = call(layer, value)
                _sync(device)
                fwd = time.perf_counter() - t0
            out_value = as_tuple(result, f"layer {name!r}")
            saved: dict[int, int] = {}
            leaf = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in value)
            # Weights and the input are accounted already (W, X): count only new storages.
            known = {e.tensor.untyped_storage().data_ptr() for e in layout.entries}
            known |= {t.untyped_storage().data_ptr() for t in leaf}

            def pack(t: torch.Tensor) -> torch.Tensor:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in known:
                    saved[ptr] = t.untyped_storage().nbytes()
                return t

            with layer_rng(0, 0, 0, i, device):
                t0 = time.perf_counter()
                hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                with torch.enable_grad(), hooks:
                    res = call(layer, leaf)
                    if i == n - 1:
                        loss = checked_loss(loss_fn, res, targets.to(device))
                        roots, grads = [loss], [torch.ones_like(loss)]
                    else:
                        outs = as_tuple(res, f"layer {name!r}")
                        roots = [o for o in outs if o.requires_grad]
                        grads = [torch.ones_like(o) for o in roots]
                if roots:
                    torch.autograd.backward(roots, grads)
                _sync(device)
                bwd = time.perf_counter() - t0
            for e in layout.trainable:
                e.tensor.grad = None
        finally:
            for e, h in zip(layout.entries, homes):
                e.tensor.data = h
        out.append(LayerProfile(
            name=name, w_bytes=layout.w_bytes, g_bytes=layout.g_bytes,
            in_bytes=_nbytes(value) / samples, in_grad_bytes=_nbytes(value, True) / samples,
            saved_bytes=sum(saved.values()) / samples, out_bytes=_nbytes(out_value) / samples,
            fwd_s=fwd / samples, bwd_s=bwd / samples))
        value = tuple(t.detach() for t in out_value)
    return out


def optimizer_state_ratio(factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                          dtype: torch.dtype = torch.float32) -> float:
    """Bytes of optimizer state per byte of parameters, probed on a small stand-in parameter.

    The probe builds the optimizer over one 4096-element parameter, takes one step with a zero
    gradient and measures the state it created. It never touches the model.
    """
    numel = 4096
    p = nn.Parameter(torch.zeros(numel, dtype=dtype))
    opt = factory([p])
    p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values()
                for t in s.values() if isinstance(t, torch.Tensor))
    return state / (numel * p.element_size())


def scaled(per_sample: float, samples: int) -> int:
    """Bytes for ``samples`` samples, rounded up."""
    return int(math.ceil(per_sample * samples))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
