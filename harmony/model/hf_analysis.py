"""Analysing a Hugging Face model once, to split it (:mod:`harmony.model.hf_split`).

:func:`analysed` runs the model's forward on six tokens (eval mode, the random state restored)
with its blocks stubbed (:mod:`harmony.model.hf_capture`), each stub returning a fresh copy of its
input and the first block run for real once to learn what blocks return. Hooks on every other
module record when it runs; every tensor computed from a stub's output is traced
(:class:`_Taint`). From that run it tells:

* the block list (the ``nn.ModuleList`` holding the most parameters) and the order of the
  block calls;
* that the blocks form a chain: each takes the hidden state the previous one returned, and
  nothing else computed from a block's output (refused otherwise, with the reason);
* the modules run before the last block call (the prologue's), the *base model* (the innermost
  module whose call spans them and the blocks), the modules it runs after its last block on
  the hidden state, in turn (the tail), and the modules run after the base model returns, or
  never (the head's);
* how a stand-in for the base model returns the hidden state (its output's class).

A model on the meta device runs on zeros on the CPU for the while (its weights are not there
yet); only the blocks the analysis stubs keep their meta tensors.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from harmony.model.hf_capture import (
    HOW_TO,
    Capture,
    OutputFormat,
    Unsplittable,
    hidden_argument,
    run_stubbed,
)

__all__ = ["Analysis", "analysed"]


class _Taint(TorchFunctionMode):
    """Traces which tensors are computed from the marked ones."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[int, torch.Tensor] = {}  # (holding the tensors keeps the ids unique)

    def mark(self, obj: Any) -> None:
        for t in _tensors(obj):
            self.ids[id(t)] = t

    def tainted(self, obj: Any) -> bool:
        return any(id(t) in self.ids for t in _tensors(obj))

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tainted((args, kwargs)):
            self.mark(out)
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


@dataclass
class _Event:
    """A module's call (``enter``, with its arguments), its return (``exit``, with its
    output) or a block call (``block``) on the analysing run."""

    kind: str            # "enter", "exit", "block"
    module: nn.Module | None = None
    n: int = -1          # block call number
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None


def _block_list(top: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the most parameters (the outermost of equals)."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, mod in top.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > 0 and (best is None or n > best[2]):
                best = (name, mod, n)
    if best is None:
        raise Unsplittable(f"{type(top).__name__} has no nn.ModuleList of blocks to split; "
                           f"{HOW_TO}")
    return best[0], best[1]


def _check_config(top: nn.Module) -> None:
    config = getattr(top, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise Unsplittable(f"{type(top).__name__} is an encoder-decoder model, which harmony "
                           f"does not split (its decoder needs the encoder's output); {HOW_TO}")
    layerdrop = getattr(config, "layerdrop", 0.0) or 0.0
    if layerdrop > 0:
        raise Unsplittable(f"{type(top).__name__} has layerdrop={layerdrop}, which skips blocks "
                           "at random and cannot be a fixed chain; set config.layerdrop = 0")


def _tiny_inputs(top: nn.Module) -> tuple[torch.Tensor, ...]:
    """A few token ids on the model's device: enough to run its forward once."""
    param = next((p for p in top.parameters() if not p.is_meta), None)
    device = param.device if param is not None else torch.device("cpu")
    get = getattr(top, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    vocab = getattr(embed, "num_embeddings", None) or getattr(
        getattr(top, "config", None), "vocab_size", None) or 2
    ids = torch.arange(1, 7, device=device).remainder(int(vocab)).unsqueeze(0)
    return (ids,)


def _call_kwargs(top: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it: a training forward needs no cache."""
    try:
        params = inspect.signature(top.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _parents(top: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """Module id -> (its first parent, its name there)."""
    out: dict[int, tuple[nn.Module, str]] = {}
    for mod in top.modules():
        for name, child in mod._modules.items():
            if child is not None and id(child) not in out:
                out[id(child)] = (mod, name)
    return out


def _outermost(mods: list[nn.Module], parents: dict[int, tuple[nn.Module, str]]
               ) -> list[nn.Module]:
    """``mods`` without those inside another of them, once each, in order."""
    ids = {id(m) for m in mods}
    out, seen = [], set()
    for m in mods:
        up, inner = parents.get(id(m)), False
        while up is not None:
            if id(up[0]) in ids:
                inner = True
                break
            up = parents.get(id(up[0]))
        if not inner and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _has_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


@dataclass
class _Run:
    """The analysing run of the model's forward: its block calls and module events."""

    cap: Capture
    events: list[_Event]
    taint: _Taint
    fmt: OutputFormat
    inputs: tuple[torch.Tensor, ...]


def _analysing_run(top: nn.Module, blocks: Sequence[nn.Module], skip: set[int],
                   call_kwargs: dict[str, Any]) -> _Run:
    """Run the forward on a few tokens with the blocks stubbed (each returning a fresh copy of
    its input, traced), recording every other module's calls and running the first block for
    real once to learn what blocks return."""
    inputs = _tiny_inputs(top)
    events: list[_Event] = []
    handles = []
    for mod in top.modules():
        if id(mod) in skip:
            continue
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, k: events.append(_Event("enter", m, args=a, kwargs=k)),
            with_kwargs=True))
        handles.append(mod.register_forward_hook(
            lambda m, a, o: events.append(_Event("exit", m, output=o)), always_call=True))
    taint = _Taint()
    fmt = OutputFormat()

    def output(n: int, i: int, hidden: torch.Tensor, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
        nonlocal fmt
        if n == 0:  # the real block once: what does it return?
            block = blocks[i]
            with torch._C.DisableTorchFunction():
                real = type(block).forward(block, *args, **kwargs)
            OutputFormat.hidden_of(real, type(block).__name__)
            fmt = OutputFormat(None if isinstance(real, torch.Tensor) else tuple(real[1:]))
            taint.mark(fmt.rest)
        fresh = hidden.clone()
        taint.mark(fresh)
        events.append(_Event("block", n=n))
        return fmt.wrap(fresh)

    try:
        with torch.no_grad(), taint:
            cap = run_stubbed(lambda: top(*inputs, **call_kwargs), blocks, output,
                              stop_after=None)
    except Unsplittable:
        raise
    except Exception as err:
        raise Unsplittable(f"harmony could not run {type(top).__name__}'s forward on a few "
                           f"tokens to split it ({type(err).__name__}: {err}); {HOW_TO}") from err
    finally:
        for h in handles:
            h.remove()
    return _Run(cap, events, taint, fmt, inputs)


@contextlib.contextmanager
def _analysing(top: nn.Module, skip: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode (no dropout), the random state and the training mode restored after. A model
    on the meta device (its weights not there yet) runs on zeros on the CPU instead: its
    modules but ``skip`` (the blocks the analysis stubs) hold zeros for the while."""
    modes = [(m, m.training) for m in top.modules()]
    param = next(top.parameters(), None)
    devices = [param.device] if param is not None and param.device.type == "cuda" else []
    skipped = {id(m) for b in skip for m in b.modules()}
    shadows: dict[int, torch.Tensor] = {}  # (a tensor shared by two modules: one zero copy)
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    for m in top.modules():
        if id(m) in skipped:
            continue
        tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
        for table in tables:
            for name, t in table.items():
                if t is not None and t.is_meta:
                    if id(t) not in shadows:
                        zero = torch.zeros(t.shape, dtype=t.dtype)
                        shadows[id(t)] = nn.Parameter(zero, t.requires_grad) \
                            if isinstance(t, nn.Parameter) else zero
                    swapped.append((table, name, t))
                    table[name] = shadows[id(t)]
    try:
        with torch.random.fork_rng(devices=devices):
            top.eval()
            yield
    finally:
        for table, name, t in swapped:
            table[name] = t
        for m, mode in modes:
            m.train(mode)


@dataclass
class Analysis:
    """What :func:`analysed` found (see the module docstring).

    Attributes:
        list_name: the block list's module path. blocks: its blocks. order: the block index
            of each block call. names: each call's layer name (``model.layers.3``; a block
            called again: ``model.layers.3@2``). fmt: what blocks return. call_kwargs: what
            the model's forward is called with besides the inputs (``use_cache=False``).
        returned: the model's output on the analysing run. inputs: its inputs. last_hidden:
            the hidden state the last block call returned there.
        prologue: the modules run before the last block call. loose: ``(module, name)`` of
            parameters and buffers directly on the base model or above (the prologue's).
        tail: the base model's modules run on the hidden state after its last block, in turn.
        epilogue: the modules run after the base model returns, or never.
        spanning: the base model. slot: ``(parent, name)`` holding it (None: it is the model
            itself). stand_in: ``hidden -> what the base model returns`` (None likewise).
    """

    list_name: str
    blocks: list[nn.Module]
    order: list[int]
    names: list[str]
    fmt: OutputFormat
    call_kwargs: dict[str, Any]
    returned: Any
    inputs: tuple[torch.Tensor, ...]
    last_hidden: torch.Tensor
    prologue: list[nn.Module]
    loose: list[tuple[nn.Module, str]]
    tail: list[nn.Module]
    epilogue: list[nn.Module]
    spanning: nn.Module
    slot: tuple[nn.Module, str] | None
    stand_in: Callable[[torch.Tensor], Any] | None


@contextlib.contextmanager
def analysed(top: nn.Module) -> Iterator[Analysis]:
    """Analyse ``top`` (a ``transformers`` model); the body runs while a meta model still
    holds its zeros (so it can run the head on :attr:`Analysis.last_hidden`).

    Raises:
        Unsplittable: why the model cannot be split, and how to declare its chain by hand.
    """
    _check_config(top)
    list_name, block_list = _block_list(top)
    blocks = list(block_list)
    parents = _parents(top)
    ancestors = []
    up = parents.get(id(block_list))
    while up is not None:
        ancestors.append(up[0])
        up = parents.get(id(up[0]))
    call_kwargs = _call_kwargs(top)
    with _analysing(top, blocks[1:]):
        run = _analysing_run(top, blocks, {id(m) for b in blocks for m in b.modules()},
                             call_kwargs)
        cap = run.cap
        if not cap.calls:
            raise Unsplittable(f"{type(top).__name__}'s forward never called its blocks "
                               f"({list_name}); {HOW_TO}")
        order = [i for i, _, _ in cap.calls]
        names = _call_names(list_name, order)
        _check_flow(cap, blocks, run.taint, names)
        parts = _parts(top, run, blocks, block_list, ancestors, parents)
        base = parts.spanning is not top
        yield Analysis(
            list_name, blocks, order, names, run.fmt, call_kwargs, cap.returned, run.inputs,
            OutputFormat.hidden_of(cap.outputs[-1], names[-1]), parts.prologue, parts.loose,
            parts.tail, parts.epilogue, parts.spanning,
            parents[id(parts.spanning)] if base else None,
            _stand_in(run.events, parts.spanning) if base else None)


@dataclass
class _Parts:
    """Which modules the prologue and the epilogue hold."""

    prologue: list[nn.Module]
    loose: list[tuple[nn.Module, str]]  # tensors directly on the base model (or above)
    tail: list[nn.Module]
    epilogue: list[nn.Module]
    spanning: nn.Module


def _parts(top: nn.Module, run: _Run, blocks: Sequence[nn.Module], block_list: nn.Module,
           ancestors: Sequence[nn.Module], parents: dict[int, tuple[nn.Module, str]]) -> _Parts:
    """Modules run before the last block call go to the prologue; the base model's modules
    run after it on the hidden state (the tail) and the modules run after the base model
    returns go to the epilogue; so do modules never run (their weights get no gradient)."""
    events = run.events
    ancestor_ids = {id(m) for m in ancestors} | {id(block_list)}
    block_at = [k for k, e in enumerate(events) if e.kind == "block"]
    first, last = block_at[0], block_at[-1]
    enters = [(k, e) for k, e in enumerate(events)
              if e.kind == "enter" and id(e.module) not in ancestor_ids]
    # the base model: the innermost ancestor whose call spans the prologue's modules and the
    # blocks (in the head, the model's forward runs with it replaced)
    spans = _spans(events)
    earliest = min([k for k, _ in enters if k < last] + [first])
    spanning = next((a for a in ancestors if spans.get(id(a), (10**9, 0))[0] < earliest
                     and spans[id(a)][1] > last), top)
    end = spans[id(spanning)][1]
    tail = _tail_path(events, last, end, OutputFormat.hidden_of(run.cap.outputs[-1], "block"))
    pre = _outermost([e.module for k, e in enters if k < last and e.module is not None],
                     parents)
    after = [m for m in _outermost([e.module for k, e in enters if k > end
                                    and e.module is not None], parents)
             if not any(m is t for t in tail)]
    both = [m for m in pre if any(m is t for t in (*tail, *after)) and _has_tensors(m)]
    if both:
        raise Unsplittable(f"{type(both[0]).__name__} runs both before the first block and after "
                           f"the last of {type(top).__name__}, so its weights would belong to two "
                           f"layers; {HOW_TO}")
    covered = {id(t) for m in (*pre, *tail, *after, *blocks)
               for t in (*m.parameters(), *m.buffers())}
    # parameters and buffers directly on the base model (or above): the prologue's
    loose = [(a, n) for a in ancestors
             for n, t in (*a.named_parameters(recurse=False), *a.named_buffers(recurse=False))
             if t is not None and id(t) not in covered]
    unused = [m for m in top.modules() if id(m) not in ancestor_ids and _has_tensors(m)
              and not any(id(t) in covered for t in (*m.parameters(), *m.buffers()))]
    return _Parts(pre, loose, tail, [*after, *_outermost(unused, parents)], spanning)


def _call_names(list_name: str, order: Sequence[int]) -> list[str]:
    names: list[str] = []
    count: dict[int, int] = {}
    for i in order:
        count[i] = count.get(i, 0) + 1
        names.append(f"{list_name}.{i}" if count[i] == 1 else f"{list_name}.{i}@{count[i]}")
    return names


def _spans(events: Sequence[_Event]) -> dict[int, tuple[int, int]]:
    """Per module, the (enter, exit) event indices of its first call."""
    out: dict[int, tuple[int, int]] = {}
    open_: dict[int, list[int]] = {}
    for k, e in enumerate(events):
        if e.kind == "enter":
            open_.setdefault(id(e.module), []).append(k)
        elif e.kind == "exit" and open_.get(id(e.module)):
            start = open_[id(e.module)].pop()
            out.setdefault(id(e.module), (start, k))
    return out


def _check_flow(cap: Any, blocks: Sequence[nn.Module], taint: _Taint,
                names: Sequence[str]) -> None:
    """Refuse blocks that need anything of an earlier block but its hidden state."""
    for n in range(1, len(cap.calls)):
        i, args, kwargs = cap.calls[n]
        hidden = hidden_argument(blocks[i], args, kwargs)
        before = OutputFormat.hidden_of(cap.outputs[n - 1], names[n - 1])
        if hidden is not before:
            why = ("a tensor computed from" if taint.tainted(hidden)
                   else "a tensor other than")
            raise Unsplittable(f"{names[n]} receives as its hidden state {why} the hidden state "
                               f"{names[n - 1]} returned: the model's forward changes it between "
                               f"blocks; {HOW_TO}")
        leaves = [t for t in _tensors((args, kwargs)) if t is not hidden]
        if any(taint.tainted(t) for t in leaves):
            raise Unsplittable(f"{names[n]} receives, besides its hidden state, a tensor computed "
                               "from an earlier block's output: its blocks need each other's "
                               f"outputs and cannot be a chain; {HOW_TO}")


def _tail_path(events: Sequence[_Event], last: int, end: int,
               hidden: torch.Tensor) -> list[nn.Module]:
    """The modules the base model runs after its last block on the hidden state, in turn:
    each takes the previous one's output (the last block's first) as its only argument.
    Modules on other paths (a pooler reading the first token) are not part of it."""
    expected: Any = hidden
    path: list[nn.Module] = []
    k = last + 1
    while k < end:
        e = events[k]
        if e.kind == "enter" and len(e.args) == 1 and not e.kwargs and e.args[0] is expected:
            assert e.module is not None
            exit_k = next(j for j in range(k + 1, len(events))
                          if events[j].kind == "exit" and events[j].module is e.module)
            path.append(e.module)
            expected = events[exit_k].output
            k = exit_k
        k += 1
    return path


def _stand_in(events: Sequence[_Event], spanning: nn.Module) -> Callable[[torch.Tensor], Any]:
    """How the base model's stand-in wraps the hidden state: as the base model's output."""
    out = next(e.output for e in events if e.kind == "exit" and e.module is spanning)
    if isinstance(out, torch.Tensor):
        return lambda h: h
    if isinstance(out, tuple):
        return lambda h: (h,)
    cls = type(out)
    if hasattr(out, "last_hidden_state"):
        return lambda h: cls(last_hidden_state=h)
    raise Unsplittable(f"{type(spanning).__name__} returns a {cls.__name__}, which harmony cannot "
                       f"stand in for; {HOW_TO}")
