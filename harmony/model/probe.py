"""Checking, before training, that a chain harmony split by itself computes what the model does.

Whenever harmony splits a model into layers on its own (an ``nn.Sequential``, which a subclass
may give another ``forward``; a Hugging Face model, whose ``forward`` harmony reproduces in
pieces), :func:`check_chain` runs the model and the chain on a probe batch and compares, in
the model's dtype:

* the outputs;
* the gradients of a sample of parameters (the smallest trainable one of every layer, and the
  next smallest if it is small) after a backward from the same random weighting of the
  outputs.

Each layer of the chain runs with only its own weights present (every other parameter and
buffer of the model is swapped for an empty tensor while it runs), as in training, where the
other layers' weights may be elsewhere: a layer that reads another layer's weights fails here,
not in the middle of a run.

A chain that computes something else is refused with :class:`ChainMismatch`, naming the
measured difference and how to declare the chain by hand. Dropout draws in another order in a
chain than in the model in some models, so a mismatch in training mode is checked again in
eval mode, which decides.

Cost: one forward and backward of the whole model on the probe batch (two samples; for a
Hugging Face model, their first 32 tokens), on the device and in the dtype the model's
parameters are in, with gradients only for the sampled parameters (at most two tensors per
layer: an embedding table's, otherwise small ones), then the same through the chain. It
holds the probe batch's activations of the whole model once; the model's weights, buffers,
gradients, random state and training mode are left as they were.
``Trainer(check_chain=False)`` skips it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harmony.model.chain import Chain, as_tuple, call

__all__ = ["RTOL", "ChainMismatch", "ProbeResult", "check_chain"]

# The largest difference accepted, relative to the largest magnitude of the compared tensor.
# The chain runs the model's own operations in the same order, so it is 0 in practice.
RTOL = 1e-5

_HOW_TO = ("declare the chain by hand (give the model, or a module wrapping it, a method "
           "harmony_chain() returning its layers: README 'Declaring the chain of your own "
           "model', docs/hf.md), or pass check_chain=False to train on this chain anyway")


class ChainMismatch(ValueError):
    """The chain harmony split a model into does not compute what the model computes.

    Attributes:
        what: the output or parameter that differs. difference: max |chain - model|.
        relative: that, over the largest magnitude of the model's value.
    """

    def __init__(self, message: str, what: str = "", difference: float = float("nan"),
                 relative: float = float("nan")) -> None:
        super().__init__(message)
        self.what, self.difference, self.relative = what, difference, relative


@dataclass
class ProbeResult:
    """What :func:`check_chain` compared: the probe batch's shapes, the sampled parameters,
    the largest relative difference seen and whether it took eval mode to agree."""

    shapes: list[tuple[int, ...]]
    parameters: list[str]
    relative: float
    eval_mode: bool = False


# A layer's second-smallest parameter is sampled only up to this many elements (its smallest
# always, be it an embedding table): the probe's gradients stay small.
SECOND_SAMPLE = 1 << 22


def _sample(chain: Chain) -> list[tuple[str, nn.Parameter]]:
    """Per layer, its smallest trainable parameter not sampled yet, and the next smallest if
    it has at most :data:`SECOND_SAMPLE` elements."""
    names = {id(p): n for n, p in chain.model.named_parameters()}
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for layer in chain.layers:
        params = sorted((p for p in layer.parameters() if p.requires_grad and id(p) not in seen),
                        key=lambda p: p.numel())
        for k, p in enumerate(params[:2]):
            if k and p.numel() > SECOND_SAMPLE:
                break
            seen.add(id(p))
            out.append((names.get(id(p), "?"), p))
    return out


@contextlib.contextmanager
def _probing(model: nn.Module, sample: Sequence[nn.Parameter],
             device: torch.device) -> Iterator[None]:
    """Gradients only for ``sample``; everything the probe touches restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    keep = {id(p) for p in sample}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for p in params:
                p.requires_grad_(id(p) in keep)
                p.grad = None
            yield
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        for m, t in modes:
            m.train(t)


@contextlib.contextmanager
def _only(present: set[int], tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Swap every tensor but those in ``present`` for an empty one while the body runs."""
    away = [(t, t.data) for t in tensors if id(t) not in present]
    for t, data in away:
        t.data = torch.empty(0, dtype=data.dtype, device=data.device)
    try:
        yield
    finally:
        for t, data in away:
            t.data = data


def _floats(value: object) -> list[torch.Tensor]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _weights(outs: Sequence[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype)
            for t in outs]


def _backward(outs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> None:
    loss = sum(((o * w).sum() for o, w in zip(outs, weights) if o.requires_grad),
               torch.zeros(()))
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()


def _compose(chain: Chain, x: tuple[torch.Tensor, ...], single: bool) -> object:
    tensors = [*chain.model.parameters(), *chain.model.buffers()]
    value: tuple[torch.Tensor, ...] = x
    out: object = x[0] if single else x
    for name, layer in zip(chain.names, chain.layers):
        mine = {id(t) for t in (*layer.parameters(), *layer.buffers())}
        try:
            with _only(mine, tensors):
                out = call(layer, value)
        except Exception as err:
            if _fails_whole(layer, value):  # every weight present: the input's own error
                raise  # (a batch of the wrong shape, say), as plain PyTorch gives it
            raise ChainMismatch(
                f"layer {name!r} of the chain harmony split {type(chain.model).__name__} into "
                f"failed when only its own weights were present ({type(err).__name__}: {err}); "
                f"it reads weights of another layer, which training cannot give it; "
                f"{_HOW_TO}", what=name) from err
        value = as_tuple(out, f"layer {name!r}")
    return out


def _fails_whole(layer: nn.Module, value: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``layer`` fails on ``value`` with every weight of the model present too: then
    the failure is not that of a layer reading another layer's weights."""
    try:
        with torch.no_grad():
            call(layer, tuple(t.clone() for t in value))
    except Exception:
        return True
    return False


def _difference(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """max |got - want|, and that over max |want|."""
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if torch.equal(got, want):
        return 0.0, 0.0
    diff = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    return diff, diff / scale if scale > 0 else float("inf")


def _run(chain: Chain, x: tuple[torch.Tensor, ...], single: bool,
         sample: Sequence[tuple[str, nn.Parameter]]) -> tuple[str, float, float]:
    """Compare once; returns what differs most, by how much and how much relatively. The
    chain runs first: a layer that cannot run is reported by harmony's own message."""
    # Each run gets its own copy of the batch: a layer may change its input in place.
    torch.manual_seed(0)
    got = _floats(_compose(chain, tuple(t.clone() for t in x), single))
    weights = _weights(got)
    _backward(got, weights)
    got_g = [p.grad.detach().clone() if p.grad is not None else None for _, p in sample]
    for _, p in sample:
        p.grad = None
    torch.manual_seed(0)
    want = _floats(chain.reference(tuple(t.clone() for t in x), single))
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return (f"the output (shapes {[tuple(t.shape) for t in got]}, the model's "
                f"{[tuple(t.shape) for t in want]})", float("inf"), float("inf"))
    _backward(want, weights)
    worst = ("", 0.0, 0.0)
    pairs: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = [
        (f"output {i}" if len(want) > 1 else "the output", g, w)
        for i, (g, w) in enumerate(zip(got, want))]
    pairs += [(f"the gradient of {n}", g, p.grad) for (n, p), g in zip(sample, got_g)]
    for what, g, w in pairs:
        if g is None and w is None:
            continue
        if g is None or w is None:
            return f"{what} (one of the two has none)", float("inf"), float("inf")
        diff, rel = _difference(g.detach(), w.detach())
        if rel > worst[2] or not worst[0]:
            worst = (what, diff, rel)
    for _, p in sample:
        p.grad = None
    return worst


def check_chain(chain: Chain, inputs: tuple[torch.Tensor, ...],
                single: bool) -> ProbeResult | None:
    """Refuse a chain harmony split that does not compute what its model computes.

    Args:
        chain: the chain; only one harmony split by itself whose model has a forward to
            compare with (``chain.checkable``) is checked.
        inputs: a batch of the chain's input, as a tuple (its first samples are used).
        single: the input is one tensor (not a tuple).

    Returns:
        What was compared, or None when there was nothing to check.

    Raises:
        ChainMismatch: the outputs or a sampled gradient differ by more than :data:`RTOL`
            (relative to the model's value), or a layer needs another layer's weights; the
            message names the difference and how to declare the chain by hand.

    Example::

        check_chain(Chain(model), (input_ids,), single=True)   # None, a result or raises
    """
    if not chain.checkable:
        return None
    model = chain.model
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_meta:
        return None  # nothing to compute with: the weights are not there yet
    device = param.device if param is not None else torch.device("cpu")
    x = tuple(t.to(device) for t in chain.probe_inputs(inputs))
    sample = _sample(chain)
    training = any(m.training for m in model.modules())
    with _probing(model, [p for _, p in sample], device):
        what, diff, rel = _run(chain, x, single, sample)
        eval_mode = False
        if rel > RTOL and training:
            model.eval()
            what, diff, rel = _run(chain, x, single, sample)
            eval_mode = True
    if rel > RTOL:
        raise ChainMismatch(
            f"the chain harmony split {type(model).__name__} into does not compute what the "
            f"model computes: on a probe batch of shape {[tuple(t.shape) for t in x]}, "
            f"{what} differs by {diff:.3g} ({rel:.3g} of its largest magnitude; at most "
            f"{RTOL:g} is accepted); {_HOW_TO}", what=what, difference=diff, relative=rel)
    return ProbeResult([tuple(t.shape) for t in x], [n for n, _ in sample], rel, eval_mode)
