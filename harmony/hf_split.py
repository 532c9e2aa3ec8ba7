"""Any Hugging Face model whose blocks sit in one ``nn.ModuleList``, as a chain of layers.

:func:`split` finds the block list (the ``nn.ModuleList`` holding the most parameters) and runs
the model's forward once on a few tokens with its blocks stubbed (:mod:`harmony.hf_capture`),
watching which modules run before the first block, between and after the last. That gives

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

While analysing, every tensor computed from a block's output is traced: a block that receives
another block's output other than as its hidden state, or a hidden state the forward changes
between two blocks, cannot be a chain, and the model is refused saying which and how to
declare the chain by hand. What the analysis cannot see (code after the last block that does
more than call modules in turn, a layer reading another layer's weights) is caught by the
check of :mod:`harmony.probe` before training.
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

from harmony.hf_capture import OutputFormat, Structures, Unsplittable, run_stubbed
from harmony.tied import alias

__all__ = ["HOW_TO", "HFSplit", "split"]

HOW_TO = ("declare the chain by hand: give a module wrapping the model a method harmony_chain() "
          "returning (name, layer) pairs (an embedding layer, one layer per block, a head); each "
          "layer takes the previous layer's output, a tensor or a tuple of tensors spread over "
          "its positional arguments (see docs/hf.md)")

PROBE_SAMPLES, PROBE_TOKENS = 2, 32  # the probe's slice of a batch (harmony.probe)


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
    spanning: nn.Module | None     # the base model, stubbed for the head's code (None: top)
    spanning_slot: tuple[nn.Module, str] | None
    spanning_output: Callable[[torch.Tensor], Any] | None

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
    (see :mod:`harmony.hf_capture`)."""

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
        if s.spanning_slot is None:
            return hidden
        assert s.spanning_output is not None
        parent, name = s.spanning_slot
        original = parent._modules[name]
        assert original is not None
        with _replaced(parent, name, _Returns(s.spanning_output(hidden), original)):
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
    kind: str            # "enter", "exit", "block"
    module: nn.Module | None = None
    n: int = -1          # block call number
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None


def _block_list(top: nn.Module) -> tuple[str, nn.ModuleList]:
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
    param = next(p for p in top.parameters() if not p.is_meta) if any(
        not p.is_meta for p in top.parameters()) else torch.zeros(())
    get = getattr(top, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    vocab = getattr(embed, "num_embeddings", None) or getattr(
        getattr(top, "config", None), "vocab_size", None) or 2
    ids = torch.arange(1, 7, device=param.device).remainder(int(vocab)).unsqueeze(0)
    return (ids,)


def _call_kwargs(top: nn.Module) -> dict[str, Any]:
    try:
        params = inspect.signature(top.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _parents(top: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    out: dict[int, tuple[nn.Module, str]] = {}
    for mod in top.modules():
        for name, child in mod._modules.items():
            if child is not None and id(child) not in out:
                out[id(child)] = (mod, name)
    return out


def _outermost(mods: list[nn.Module], parents: dict[int, tuple[nn.Module, str]]
               ) -> list[nn.Module]:
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

    cap: Any
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


def split(model: nn.Module, top: nn.Module) -> HFSplit:
    """Split ``top`` (a ``transformers`` model; ``model`` is what the user gave, the same or a
    ``peft`` model around it) into a chain. See the module docstring.

    Raises:
        Unsplittable: why the model cannot be split automatically, and how to declare its
            chain by hand.
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
        shared = _Model(top, blocks, order, run.fmt, Structures(names), call_kwargs,
                        _field(cap.returned),
                        None if parts.spanning is top else parts.spanning,
                        None if parts.spanning is top else parents[id(parts.spanning)],
                        None if parts.spanning is top else _stand_in(run.events,
                                                                     parts.spanning))
        epilogue = Epilogue(shared, parts.tail, parts.epilogue)
        _check_head(top, shared, epilogue, run)
    seen: set[int] = set()
    layers: list[tuple[str, nn.Module]] = [("embed", Prologue(shared,
                                                               parts.prologue_modules()))]
    for n, i in enumerate(order):
        block = alias(blocks[i]) if i in seen else blocks[i]
        seen.add(i)
        layers.append((names[n], Block(shared, n, block)))
    layers.append(("head", epilogue))

    def reference(x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return shared.pick(model(*x, **call_kwargs))

    return HFSplit(layers, reference, probe_inputs)


@dataclass
class _Parts:
    """Which modules the prologue and the epilogue hold."""

    prologue: list[nn.Module]
    loose: list[tuple[nn.Module, str]]  # tensors directly on the base model (or above)
    tail: list[nn.Module]
    epilogue: list[nn.Module]
    spanning: nn.Module

    def prologue_modules(self) -> list[nn.Module]:
        """The prologue's modules, with a holder of the loose tensors (read now: after the
        analysis, which may have swapped them for zeros)."""
        tensors = [(f"{type(m).__name__}.{n}", getattr(m, n)) for m, n in self.loose]
        return [*self.prologue, *([_Holder(tensors)] if tensors else [])]


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


def _field(returned: Any) -> str | int:
    """Which field of the model's output the chain returns: its logits, else its hidden
    state, else its first item."""
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(returned, name, None), torch.Tensor):
            return name
    return 0


def _check_head(top: nn.Module, shared: _Model, epilogue: Epilogue, run: _Run) -> None:
    """The head must turn the last block's output into what the model returned (on the
    analysing run): code after the blocks that reads anything else (a pooler's output) or does
    more than call modules in turn cannot be reproduced."""
    hidden = OutputFormat.hidden_of(run.cap.outputs[-1], "the last block")
    try:
        want = shared.pick(run.cap.returned)
        with torch.no_grad():
            got = epilogue.head(hidden, run.inputs)
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
    from harmony.hf_capture import hidden_argument

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
