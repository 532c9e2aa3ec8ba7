"""Measuring layers: bytes of weights, boundary activations, saved activations, and time.

The profile runs each layer on one micro-batch (on the compute device, one layer's weights at a
time, so it fits wherever training fits): once to warm up and measure sizes, then a few timed
runs. It records per-sample sizes and times, which the planner scales to every micro-batch
size.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from harmony.chain import Chain, as_tuple, call, checked_loss
from harmony.layout import Layout
from harmony.precision import Precision
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
    # per trainable parameter: (bytes in the flat weights, in the flat gradients); empty when
    # unknown (then the planner streams the layer's update as one piece)
    params: list[tuple[int, int]] = field(default_factory=list)


def _nbytes(value: tuple[torch.Tensor, ...], floating_only: bool = False) -> int:
    return sum(t.numel() * t.element_size() for t in value
               if not floating_only or t.is_floating_point())


def profile_layers(chain: Chain, layouts: list[Layout], inputs: tuple[torch.Tensor, ...],
                   targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                   device: torch.device,
                   precision: Precision | None = None,
                   changed: set[int] | None = None) -> list[LayerProfile]:
    """Run every layer on ``inputs`` (one micro-batch) and measure it.

    Weights are moved to ``device`` one layer at a time and moved back, so the profile needs no
    more device memory than one layer. Generator states are restored afterwards. With a mixed
    ``precision``, weights take their dtypes in ``layouts`` and the layers run under its
    autocast, so activation bytes are those of training. ``changed``, if given, receives the
    ids of the buffers a forward or backward changes (BatchNorm's running statistics), which the
    runtime must then carry and restore (:mod:`harmony.buffers`).
    """
    autocast = (precision or Precision()).autocast
    samples = inputs[0].shape[0]
    value = tuple(t.to(device) for t in inputs)
    out: list[LayerProfile] = []
    n = len(chain)
    for i, (name, layer, layout) in enumerate(zip(chain.names, chain.layers, layouts)):
        homes = [e.tensor.data for e in layout.entries]
        for e in layout.entries:
            # Buffers are copied even on the same device: the profile's forward passes must
            # not change running statistics the training run will use.
            e.tensor.data = e.tensor.data.to(device, e.dtype,
                                             copy=not isinstance(e.tensor, nn.Parameter))
        try:
            # The first run of each pass warms up (allocator, lazy initialisation, kernel
            # selection) and gives the values; the time is the median of the timed repeats,
            # so one slow run on a busy machine does not skew the plan.
            forward = partial(_forward, layer, value, i, device, autocast)
            backward = partial(_backward, layer, value, layout, loss_fn, targets.to(device),
                               i, i == n - 1, name, device, autocast)
            out_value = as_tuple(forward(), f"layer {name!r}")
            saved = backward()
            fwd, bwd = _typical(forward, device), _typical(backward, device)
            if changed is not None:  # buffers the runs changed (on the profile's copies)
                changed.update(id(e.tensor) for e, h in zip(layout.entries, homes)
                               if not isinstance(e.tensor, nn.Parameter) and not torch.equal(
                                   e.tensor.data, h.to(e.tensor.device, e.tensor.dtype)))
        finally:
            for e, h in zip(layout.entries, homes):
                e.tensor.data = h
        out.append(LayerProfile(
            name=name, w_bytes=layout.w_bytes, g_bytes=layout.g_bytes,
            in_bytes=_nbytes(value) / samples, in_grad_bytes=_nbytes(value, True) / samples,
            saved_bytes=saved / samples, out_bytes=_nbytes(out_value) / samples,
            fwd_s=fwd / samples, bwd_s=bwd / samples, params=layout.trainable_spans()))
        value = tuple(t.detach() for t in out_value)
    return out


def backward_saved_bytes(layer: nn.Module, value: tuple[torch.Tensor, ...], layout: Layout,
                         loss_fn: Callable[..., torch.Tensor], targets: torch.Tensor, last: bool,
                         name: str,
                         storage_key: Callable[[torch.Tensor], int] | None = None) -> int:
    """Run ``layer`` forward with grad on ``value`` (and ``loss_fn`` if it is the ``last``
    layer), then backward; return the bytes of the tensors autograd saved for that backward.

    Weights and the input are accounted already (W, X), so only other storages count.
    ``storage_key`` tells storages apart (default: their address; meta tensors have none).
    The gradients the backward left on the weights are cleared.
    """
    key_of = storage_key or (lambda t: t.untyped_storage().data_ptr())
    leaf = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in value)
    known = {key_of(e.tensor) for e in layout.entries} | {key_of(t) for t in leaf}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = key_of(t)
        if key not in known:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = call(layer, leaf)
        if last:
            loss = checked_loss(loss_fn, res, targets)
            roots, grads = [loss], [torch.ones_like(loss)]
        else:
            roots = [o for o in as_tuple(res, f"layer {name!r}") if o.requires_grad]
            grads = [torch.ones_like(o) for o in roots]
    if roots:
        torch.autograd.backward(roots, grads)
    for e in layout.trainable:
        e.tensor.grad = None
    return sum(saved.values())


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


def _forward(layer: nn.Module, value: tuple[torch.Tensor, ...], index: int,
             device: torch.device, autocast: Callable[[torch.device], Any]) -> object:
    with layer_rng(0, 0, 0, index, device), torch.no_grad(), autocast(device):
        return call(layer, value)


def _backward(layer: nn.Module, value: tuple[torch.Tensor, ...], layout: Layout,
              loss_fn: Callable[..., torch.Tensor], targets: torch.Tensor, index: int,
              last: bool, name: str, device: torch.device,
              autocast: Callable[[torch.device], Any]) -> int:
    with layer_rng(0, 0, 0, index, device), autocast(device):
        return backward_saved_bytes(layer, value, layout, loss_fn, targets, last=last, name=name)


REPEATS = 3  # timed runs per layer and pass, after the warm-up run


def _typical(run: Callable[[], object], device: torch.device, repeats: int = REPEATS) -> float:
    """The median of ``repeats`` timed runs of ``run``, seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
