"""Measuring layers: bytes of weights, boundary activations, saved activations, and time.

The profile runs each layer on one micro-batch (on the compute device, one layer's weights at a
time, so it fits wherever training fits): once to warm up and measure sizes, then a few timed
runs. It records per-sample sizes and times, which the planner scales to every micro-batch
size. On CUDA it also measures each layer's working memory (``work_bytes``: saved tensors,
temporaries and kernels' scratch at once) with ``torch.cuda.max_memory_allocated``, which the
planner charges where it is larger than its own estimate (this resets the device's peak
memory statistics).

Given a second micro-batch, it also finds out whether each layer may run one forward over
several micro-batches at once (a forward group, see :mod:`schedules.generators`) with the same
result as one forward per micro-batch, and how long such a forward takes (larger forwards use
a device better, so time per sample is not constant). A layer may not group when its forward

* draws random numbers (its generator's state moved: dropout), since a recompute in backward
  runs per micro-batch and must draw what the forward drew;
* changes its buffers (BatchNorm's running statistics), which plain PyTorch updates once per
  micro-batch;
* passes a tensor that does not hold the samples along dim 0 (a shared mask), or treats the
  samples of a micro-batch together: its output on the two micro-batches concatenated differs
  from its outputs on each, concatenated, by more than rounding (BatchNorm in training mode).

:attr:`LayerProfile.no_group` says which, in words (:data:`UNCHECKED` without a second
micro-batch).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from harmony.model.chain import Chain, as_tuple, call, checked_loss
from harmony.model.inplace import InputCopies, changed_inputs
from harmony.model.layout import Layout
from harmony.model.precision import Precision
from harmony.model.rng import generator_index, layer_rng


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
    samples: int = 0      # the samples per micro-batch these were measured at (0: unknown)
    # per sample: one forward without grad over group_samples samples (a forward group of
    # several micro-batches); None when not measured
    fwd_group_s: float | None = None
    group_samples: int = 0
    no_group: str = ""    # why the layer cannot run one forward over several micro-batches
    # per trainable parameter: (bytes in the flat weights, in the flat gradients); empty when
    # unknown (then the planner streams the layer's update as one piece)
    params: list[tuple[int, int]] = field(default_factory=list)
    # per sample: the most bytes a forward with grad and its backward allocate besides the
    # gradients of the weights, of the input and of the output (saved tensors, temporaries,
    # kernels' scratch), from torch.cuda.max_memory_allocated; 0 where not measured (CPU)
    work_bytes: float = 0.0
    # of w_bytes, the frozen parameters' (weights only: no gradient, no optimizer state, and an
    # update never reads or writes them)
    frozen_bytes: int = 0


# LayerProfile.no_group of a layer profiled without a second micro-batch to check it on.
UNCHECKED = "was not checked for forward groups (the profile saw one micro-batch)"


def _nbytes(value: tuple[torch.Tensor, ...], floating_only: bool = False) -> int:
    return sum(t.numel() * t.element_size() for t in value
               if not floating_only or t.is_floating_point())


def profile_layers(chain: Chain, layouts: list[Layout], inputs: tuple[torch.Tensor, ...],
                   targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                   device: torch.device,
                   precision: Precision | None = None,
                   changed: set[int] | None = None,
                   group_inputs: tuple[torch.Tensor, ...] | None = None,
                   copies: InputCopies | None = None,
                   values: Callable[[int], AbstractContextManager[object]] | None = None,
                   ) -> list[LayerProfile]:
    """Run every layer on ``inputs`` (one micro-batch) and measure it.

    Weights are moved to ``device`` one layer at a time and moved back, so the profile needs no
    more device memory than one layer. Generator states are restored afterwards. With a mixed
    ``precision``, weights take their dtypes in ``layouts`` and the layers run under its
    autocast, so activation bytes are those of training. ``changed``, if given, receives the
    ids of the buffers a forward or backward changes (BatchNorm's running statistics), which the
    runtime must then carry and restore (:mod:`harmony.model.buffers`). ``group_inputs``, the next
    micro-batch's inputs, if given: each layer is also checked for forward groups and timed
    over both micro-batches at once (``no_group``, ``fwd_group_s``; see the module docstring).
    A layer that changes its input in place gets a private copy of it from then on, through
    ``copies`` (:mod:`harmony.model.inplace`; which the caller keeps for training and removes when
    done); without ``copies``, only for the profile.

    ``values(i)``, if given, is entered around layer ``i``'s runs: it gives the layer its
    weights for that long (a model built on the meta device, see :mod:`harmony.model.materialize`,
    or packs whose weights live away from their layers), so that only one layer's weights
    are in host memory at a time.
    """
    own_copies = copies is None
    copies = InputCopies() if copies is None else copies
    try:
        return _profile_layers(chain, layouts, inputs, targets, loss_fn, device, precision,
                               changed, group_inputs, copies, values)
    finally:
        if own_copies:
            copies.remove()


def _profile_layers(chain: Chain, layouts: list[Layout], inputs: tuple[torch.Tensor, ...],
                    targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                    device: torch.device, precision: Precision | None,
                    changed: set[int] | None, group_inputs: tuple[torch.Tensor, ...] | None,
                    copies: InputCopies,
                    values: Callable[[int], AbstractContextManager[object]] | None,
                    ) -> list[LayerProfile]:
    autocast = (precision or Precision()).autocast
    samples = inputs[0].shape[0]
    value = tuple(t.to(device) for t in inputs)
    other = None if group_inputs is None else tuple(t.to(device) for t in group_inputs)
    out: list[LayerProfile] = []
    n = len(chain)
    for i, (name, layer, layout) in enumerate(zip(chain.names, chain.layers, layouts)):
        with values(i) if values is not None else contextlib.nullcontext():
            homes = [e.tensor.data for e in layout.entries]
            for e in layout.entries:
                # Buffers are copied even on the same device: the profile's forward passes must
                # not change running statistics the training run will use.
                e.tensor.data = e.tensor.data.to(device, e.dtype,
                                                 copy=not isinstance(e.tensor, nn.Parameter))
            try:
                if layer not in copies:  # (before any run: the value must stay as it is)
                    with autocast(device):
                        positions = changed_inputs(layer, value)
                    if positions:
                        copies.add(layer, positions)
                # The first run of each pass warms up (allocator, lazy initialisation, kernel
                # selection) and gives the values; the time is the median of the timed repeats,
                # so one slow run on a busy machine does not skew the plan.
                forward = partial(_forward, layer, value, i, device, autocast)
                backward = partial(_backward, layer, value, layout, loss_fn, targets.to(device),
                                   i, i == n - 1, name, device, autocast)
                out_value = as_tuple(forward(), f"layer {name!r}")
                saved = backward()
                fwd, bwd = _typical(forward, device), _typical(backward, device)
                # (after the warm-up, so one-time workspaces are not taken for working memory)
                grads = sum(e.tensor.numel() * e.tensor.element_size() for e in layout.trainable)
                grads += _nbytes(value, floating_only=True)
                grads += 0 if i == n - 1 else _nbytes(out_value, floating_only=True)
                work = max(0, peak_allocated(backward, device) - grads)
                check = Grouping(UNCHECKED, None, None)
                if other is not None:
                    check = _group_check(layer, layout, value, other, out_value, i, device,
                                         autocast)
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
            fwd_s=fwd / samples, bwd_s=bwd / samples, samples=samples,
            fwd_group_s=None if check.seconds is None else check.seconds / check.samples,
            group_samples=check.samples, no_group=check.why_not,
            params=layout.trainable_spans(), work_bytes=work / samples,
            frozen_bytes=layout.w_bytes - layout.frozen_start))
        value = tuple(t.detach() for t in out_value)
        other = None if check.other is None else tuple(t.detach() for t in check.other)
    return out


@dataclass
class Grouping:
    """What :func:`_group_check` found: why the layer cannot group ("" when it can), the
    seconds of one forward over both micro-batches at once and their samples (when it can),
    and its output on the second micro-batch (None when there is none)."""

    why_not: str
    seconds: float | None
    other: tuple[torch.Tensor, ...] | None
    samples: int = 0


def _group_check(layer: nn.Module, layout: Layout, value: tuple[torch.Tensor, ...],
                 other: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...], index: int,
                 device: torch.device, autocast: Callable[[torch.device], Any]) -> Grouping:
    """Whether ``layer`` may run one forward over micro-batches ``value`` and ``other``
    together (``out``: its output on ``value``); see the module docstring."""
    buffers = [e.tensor for e in layout.entries if not isinstance(e.tensor, nn.Parameter)]
    before = [b.detach().clone() for b in buffers]
    with layer_rng(0, 0, 1, index, device), torch.no_grad(), autocast(device):
        state = _rng_state(device)
        try:
            out_other = as_tuple(call(layer, other), f"layer {index}")
        except Exception as err:  # (a second micro-batch of another size, say)
            return Grouping(f"fails on a second micro-batch ({type(err).__name__}: {err})",
                            None, None)
        draws = not all(torch.equal(a, b) for a, b in zip(state, _rng_state(device)))
    if draws:
        return Grouping("draws random numbers in its forward (dropout)", None, out_other)
    if any(not torch.equal(b, was) for b, was in zip(buffers, before)):
        return Grouping("changes its buffers in its forward (running statistics)", None,
                        out_other)
    n, n_other = value[0].shape[0], other[0].shape[0]
    for what, values, samples in (("input", value, n), ("input", other, n_other),
                                  ("output", out, n), ("output", out_other, n_other)):
        for j, t in enumerate(values):
            if t.dim() == 0 or t.shape[0] != samples:
                return Grouping(f"passes a tensor without the samples along dim 0 ({what} {j} "
                                f"of shape {tuple(t.shape)} in a micro-batch of {samples})",
                                None, out_other)
    both = tuple(torch.cat([a, b]) for a, b in zip(value, other))

    def forward() -> tuple[torch.Tensor, ...]:
        with layer_rng(0, 0, 0, index, device), torch.no_grad(), autocast(device):
            return as_tuple(call(layer, both), f"layer {index}")

    try:
        together = forward()
    except Exception as err:
        return Grouping(f"fails on two micro-batches at once ({type(err).__name__}: {err})",
                        None, out_other)
    for j, (t, a, b) in enumerate(zip(together, out, out_other)):
        want = torch.cat([a, b])
        if t.shape != want.shape or t.dtype != want.dtype:
            return Grouping(f"gives output {j} of shape {tuple(t.shape)} on two micro-batches "
                            f"at once, not {tuple(want.shape)}", None, out_other)
        if not t.is_floating_point() or not t.numel():
            if not torch.equal(t, want):
                return Grouping(f"treats the samples of a micro-batch together: its output {j}"
                                " on two micro-batches at once differs from its outputs on each",
                                None, out_other)
            continue
        scale = max(float(want.abs().max()), 1e-30)
        diff = float((t - want).abs().max()) / scale
        if not diff <= group_tolerance(t.dtype):  # (NaN fails too)
            return Grouping(f"treats the samples of a micro-batch together (as BatchNorm in "
                            f"training mode does): its output {j} on two micro-batches at "
                            f"once differs from its outputs on each by {diff:.1e} of its "
                            "largest value", None, out_other)
    return Grouping("", _typical(forward, device), out_other, n + n_other)


def group_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to its largest value) a layer's output on two micro-batches at once
    may differ from its outputs on each and still count as equal up to rounding: matrix
    products over more rows round differently (about 1e-7 relative in fp32), while a layer
    that mixes samples differs by a sizeable fraction of its values."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The generators' states a layer on ``device`` draws from."""
    states = [torch.get_rng_state()]
    index = generator_index(device)
    if index is not None:
        states.append(torch.cuda.get_rng_state(index))
    return states


def backward_saved_bytes(layer: nn.Module, value: tuple[torch.Tensor, ...], layout: Layout,
                         loss_fn: Callable[..., torch.Tensor], targets: torch.Tensor, last: bool,
                         name: str,
                         storage_key: Callable[[torch.Tensor], int] | None = None) -> int:
    """Run ``layer`` forward with grad on ``value`` (and ``loss_fn`` if it is the ``last``
    layer), then backward; return the bytes of the tensors autograd saved for that backward.

    Weights and the input are accounted already (W, X), and the targets are the caller's
    batch (a loss saves them, often as a view of the whole batch), so only other storages
    count.
    ``storage_key`` tells storages apart (default: their address; meta tensors have none).
    The gradients the backward left on the weights are cleared.
    """
    key_of = storage_key or (lambda t: t.untyped_storage().data_ptr())
    leaf = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in value)
    known = {key_of(e.tensor) for e in layout.entries} | {key_of(t) for t in leaf}
    if last:
        known.add(key_of(targets))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = key_of(t)
        if key not in known:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        try:
            res = call(layer, leaf)
        except RuntimeError as err:
            if "in-place operation" not in str(err):
                raise
            # The layer changes its input in place (harmony.model.inplace): in training it gets a
            # private copy, whose storage then counts as saved where autograd keeps it.
            res = call(layer, tuple(t.clone() for t in leaf))
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


def peak_allocated(run: Callable[[], object], device: torch.device) -> int:
    """The most bytes ``run()`` had allocated on a CUDA ``device`` at once, above what was
    allocated when it started (``torch.cuda.max_memory_allocated``; the device's peak
    statistics are reset for it). 0 on other devices, where nothing measures it."""
    if device.type != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
