"""Any Hugging Face model whose blocks sit in one ``nn.ModuleList``, as a chain of layers.

:func:`split` analyses the model once (:mod:`harmony.model.hf_analysis`: the block list, the
modules run before the last block and after it, the base model) and builds

* the **prologue** (``embed``): every module the forward runs before the last block (token and
  position embeddings, embedding norms, rotary tables...). As a layer it runs the model's own
  forward up to the last block call, with the blocks stubbed, so position ids, rotary or ALiBi
  tables, masks and embedding scaling are computed by the model's code for each micro-batch;
* one layer per **block call**, which calls the block with exactly the arguments the model's
  forward passed it (a block called at several positions is one set of weights used several
  times: later positions hold an alias of it, trained as tied weights);
* the **epilogue** (``head``): the modules the innermost module spanning the prologue and the
  blocks (the base model) runs after its last block (the final norm), composed in turn, and
  then the model's own forward after the base model returns (the LM head and whatever the
  model does to its logits: scaling, soft-capping), run with the base model replaced by a stub
  that returns the hidden state.

The head is checked on the analysing run: from the last block's output it must give what the
model returned (a head reading a pooler's output cannot). What the analysis cannot see (a
layer reading another layer's weights, a subclass with another ``forward``) is caught by the
check of :mod:`harmony.model.probe` before training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harmony.model.hf_analysis import Analysis, analysed
from harmony.model.hf_capture import HOW_TO, OutputFormat, Structures, Unsplittable, run_stubbed
from harmony.model.tied import alias

__all__ = ["HFSplit", "split"]

PROBE_SAMPLES, PROBE_TOKENS = 2, 32  # the probe's slice of a batch (harmony.model.probe)


@dataclass
class HFSplit:
    """A Hugging Face model split into layers.

    Attributes:
        layers: ``(name, layer)`` pairs: ``embed``, one per block call, ``head``.
        reference: ``inputs -> output``: what the model itself computes (its logits).
        probe_inputs: the probe's slice of a micro-batch.
    """

    layers: list[tuple[str, nn.Module]]
    reference: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
    probe_inputs: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


# -- the pieces the layers share -------------------------------------------------------------

@dataclass
class _Model:
    """What the layers of one split share (a plain object: kept out of the module tree)."""

    top: nn.Module                 # the transformers model whose forward runs
    blocks: list[nn.Module]
    order: list[int]               # block index per block call
    fmt: OutputFormat
    structures: Structures
    call_kwargs: dict[str, Any]
    field: str | int               # the output's field holding the chain's output
    # (parent, name) of the base model, which a stand-in replaces for the head's run of the
    # model's forward, and what that stand-in returns for a hidden state (None: no base model)
    slot: tuple[nn.Module, str] | None
    stand_in: Callable[[torch.Tensor], Any] | None

    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        return self.top(*inputs, **self.call_kwargs)

    def pick(self, out: Any) -> torch.Tensor:
        if isinstance(self.field, str):
            value = getattr(out, self.field)
        else:
            value = out[self.field]
        assert isinstance(value, torch.Tensor)
        return value


class _Holder(nn.Module):
    """Parameters and buffers that live directly on a module a layer does not hold (the base
    model), held by the layer that uses them (the same tensor objects)."""

    def __init__(self, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        for name, t in tensors:
            key = name.replace(".", "_")
            if isinstance(t, nn.Parameter):
                self.register_parameter(key, t)
            else:
                self.register_buffer(key, t)


class Prologue(nn.Module):
    """``inputs -> (hidden, tag, *carried, *inputs)``: the model's forward up to its last block
    (see :mod:`harmony.model.hf_capture`)."""

    def __init__(self, shared: _Model, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self._shared = shared

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self._shared
        cap = run_stubbed(lambda: s.run(inputs), s.blocks,
                          lambda n, i, h, a, k: s.fmt.wrap(h), stop_after=len(s.order))
        got = [i for i, _, _ in cap.calls]
        if got != s.order:
            raise Unsplittable(
                f"for inputs of shape {[tuple(t.shape) for t in inputs]} the model's forward "
                f"called its blocks {_calls(got)}, not {_calls(s.order)} as when harmony split "
                f"it; its chain changes with the input; {HOW_TO}")
        return s.structures.encode(cap, s.blocks, inputs)


class Block(nn.Module):
    """``(hidden, tag, *carried) -> (hidden', tag, *carried)``: one block call with the
    arguments the model's forward passed it."""

    def __init__(self, shared: _Model, n: int, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self._shared = shared
        self._n = n

    def forward(self, hidden: torch.Tensor, tag: torch.Tensor,
                *carried: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self._shared.structures.arguments(self._n, hidden, tag, carried)
        out = self.block(*args, **kwargs)
        return (OutputFormat.hidden_of(out, type(self.block).__name__), tag, *carried)


class _Returns(nn.Module):
    """Stands in for the base model in the head's run of the model's forward: returns the
    given output; other attributes are the base model's (the head's code may read them)."""

    def __init__(self, value: Any, original: nn.Module) -> None:
        super().__init__()
        self._value = value
        self.__dict__["_original"] = original  # (not registered: the stand-in holds nothing)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._value

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


class Epilogue(nn.Module):
    """``(hidden, tag, *carried) -> output``: the base model's modules after its last block,
    then the model's forward after the base model (the LM head and its logits' scaling)."""

    def __init__(self, shared: _Model, tail: Sequence[nn.Module],
                 modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.tail = nn.ModuleList(tail)
        self.parts = nn.ModuleList(modules)
        self._shared = shared

    def forward(self, hidden: torch.Tensor, tag: torch.Tensor,
                *carried: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, self._shared.structures.inputs(tag, carried))

    def head(self, hidden: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The output from the last block's hidden state and the model's inputs."""
        s = self._shared
        for m in self.tail:
            hidden = m(hidden)
        if s.slot is None:
            return hidden
        assert s.stand_in is not None
        parent, name = s.slot
        original = parent._modules[name]
        assert original is not None
        with _replaced(parent, name, _Returns(s.stand_in(hidden), original)):
            return s.pick(s.run(inputs))


@contextlib.contextmanager
def _replaced(parent: nn.Module, name: str, stand_in: nn.Module) -> Iterator[None]:
    old = parent._modules[name]
    parent._modules[name] = stand_in
    try:
        yield
    finally:
        parent._modules[name] = old


def _calls(order: Sequence[int]) -> str:
    return f"{len(order)} times ({order[:8]}{'...' if len(order) > 8 else ''})"


# -- analysis --------------------------------------------------------------------------------

def split(model: nn.Module, top: nn.Module) -> HFSplit:
    """Split ``top`` (a ``transformers`` model; ``model`` is what the user gave, the same or a
    ``peft`` model around it) into a chain. See the module docstring.

    Raises:
        Unsplittable: why the model cannot be split automatically, and how to declare its
            chain by hand.
    """
    with analysed(top) as a:
        shared = _Model(top, a.blocks, a.order, a.fmt, Structures(a.names), a.call_kwargs,
                        _field(a.returned), a.slot, a.stand_in)
        epilogue = Epilogue(shared, a.tail, a.epilogue)
        _check_head(top, shared, epilogue, a)
    # (read after the analysis, which may have swapped a meta model's tensors for zeros)
    loose = [(f"{type(m).__name__}.{n}", getattr(m, n)) for m, n in a.loose]
    layers: list[tuple[str, nn.Module]] = [
        ("embed", Prologue(shared, [*a.prologue, *([_Holder(loose)] if loose else [])]))]
    seen: set[int] = set()
    for n, i in enumerate(a.order):
        block = alias(a.blocks[i]) if i in seen else a.blocks[i]
        seen.add(i)
        layers.append((a.names[n], Block(shared, n, block)))
    layers.append(("head", epilogue))

    def reference(x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return shared.pick(model(*x, **a.call_kwargs))

    return HFSplit(layers, reference, probe_inputs)


def _field(returned: Any) -> str | int:
    """Which field of the model's output the chain returns: its logits, else its hidden
    state, else its first item."""
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(returned, name, None), torch.Tensor):
            return name
    return 0


def _check_head(top: nn.Module, shared: _Model, epilogue: Epilogue, a: Analysis) -> None:
    """The head must turn the last block's output into what the model returned (on the
    analysing run): code after the blocks that reads anything else (a pooler's output) or does
    more than call modules in turn cannot be reproduced."""
    try:
        want = shared.pick(a.returned)
        with torch.no_grad():
            got = epilogue.head(a.last_hidden, a.inputs)
    except Exception as err:
        raise Unsplittable(f"after its last block, {type(top).__name__}'s forward computes its "
                           "output from more than that block's hidden state (harmony's head "
                           f"failed: {type(err).__name__}: {err}); {HOW_TO}") from err
    if got.shape != want.shape or not torch.equal(got, want):
        raise Unsplittable(f"after its last block, {type(top).__name__}'s forward does more to "
                           "the hidden state than call its final modules in turn and its own "
                           f"code after the base model, so harmony's head differs; {HOW_TO}")


def probe_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The first :data:`PROBE_SAMPLES` samples and :data:`PROBE_TOKENS` tokens of a batch."""
    return tuple(t[:PROBE_SAMPLES, :PROBE_TOKENS] if t.dim() >= 2 else t[:PROBE_SAMPLES]
                 for t in inputs)
