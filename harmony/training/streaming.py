"""A trainer's weights and optimizer state, read one pack (or one chunk) at a time.

:meth:`harmony.Trainer.state_dict`, :meth:`~harmony.Trainer.export` and
:meth:`~harmony.Trainer.save` read the training state through here, so that a model whose
weights exceed host memory is written to disk without ever being whole in memory: each value
is a view of one pack's home buffer, or of one chunk of it read back from NVMe into a host
buffer (from the host tier, counted in its budget, when it has room), which goes before the
next chunk is read. Before the first step the values are the model's own, a model built on the
meta device being materialized one layer at a time (:mod:`harmony.model.materialize`).

Both producers are :class:`harmony.io.tensor_files.Streamed`: the keys, dtypes and shapes first,
known without reading anything, then the values in that order. Each reads a trainer's
holdings (:mod:`harmony.training.holdings`) and what is built under its plan
(:mod:`harmony.training.built`; None before the first step).

Example::

    tensors = weights(holdings, built)
    [s.key for s in tensors.specs]          # the model's state_dict() keys
    for key, value in tensors.produce():    # one pack (or one chunk) in memory at a time
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from harmony.io.tensor_files import Streamed, TensorSpec
from harmony.runtime.host_memory import available_bytes
from schedules.task import Loc
from swap.tier import OutOfCapacity, fmt_bytes

if TYPE_CHECKING:
    from harmony.model.layout import Entry
    from harmony.runtime.pack import Pack
    from harmony.training.built import Built
    from harmony.training.holdings import Holdings
    from swap.tier import Tier

Item = tuple[str, torch.Tensor]


def refuse_unless_fits(nbytes: int) -> None:
    """Raise MemoryError when ``nbytes`` of new tensors would not fit in the memory the
    system has available (they would be swapped out, or the process killed)."""
    available = available_bytes()
    if nbytes > available:
        raise MemoryError(
            f"state_dict() would return {fmt_bytes(nbytes)} of tensors, more than the "
            f"{fmt_bytes(available)} of memory available; write them to disk pack by pack "
            "instead: trainer.export(dir) (safetensors shards that from_pretrained and "
            "weights= read) or trainer.save(dir) (a checkpoint, with the optimizer state)")


def host_buffer(host: Tier, nbytes: int, what: str) -> tuple[torch.Tensor, Callable[[], None]]:
    """A host buffer for reading back a chunk, and its release: from the ``host`` tier when
    its budget has room (between steps it has a chunk's room), else outside it."""
    try:
        buf = host.allocate(nbytes, what)
    except OutOfCapacity:
        return torch.empty(nbytes, dtype=torch.uint8), lambda: None
    return buf, lambda: host.release(buf)


def _spec(key: str, e: Entry) -> TensorSpec:
    """What ``state_dict()`` gives for entry ``e``: a trainable one's master (fp32 in mixed
    precision), anything else as it is held."""
    return TensorSpec(key, e.master_dtype if e.trainable else e.dtype, tuple(e.shape))


def weights(holdings: Holdings, built: Built | None) -> Streamed:
    """The trained weights under the model's ``state_dict()`` keys, pack by pack (a tied
    weight's keys with its owner's master), then any tensor outside the chain's layers."""
    model_sd = holdings.model_tensors()
    keys: dict[int, list[str]] = {}
    for k, v in model_sd.items():
        keys.setdefault(id(v), []).append(k)
    if built is None:
        return _weights_unbuilt(holdings, model_sd, keys)
    runtime = built.runtime
    alias = {id(s.copy): id(t.master) for t in built.ties for s in t.sharers}
    for copy, master in alias.items():  # a copy's keys show the master
        keys.setdefault(master, []).extend(keys.pop(copy, []))
    specs: list[TensorSpec] = []
    done: set[int] = set()
    for pack in runtime.packs:
        for e in pack.layout.entries:
            if id(e.tensor) not in alias:
                specs += [_spec(k, e) for k in keys.get(id(e.tensor), [])]
                done.add(id(e.tensor))
    rest = [(k, v) for k, v in model_sd.items() if id(v) not in done and id(v) not in alias]
    specs += [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in rest]

    def produce() -> Iterator[Item]:
        holdings.weights_arrived()
        for pack in runtime.packs:
            for e, value in _pack_values(holdings, built, pack):
                if id(e.tensor) not in alias:
                    for k in keys.get(id(e.tensor), []):
                        yield k, value
        for k, v in rest:
            if v.is_meta and holdings.pipeline is not None:  # another stage's: it sends it
                yield k, torch.zeros(v.shape, dtype=v.dtype)
            else:
                yield k, holdings.materializer.value(v)

    return Streamed(specs, produce)


def masters(holdings: Holdings, built: Built, pack: Pack) -> torch.Tensor:
    """``pack.master_weights()``; with a sharded optimizer in mixed precision, sent from
    the rank owning the pack (collective: every rank calls it for every pack in order)."""
    dp = holdings.dp
    if pack.owned or not pack.layout.mixed:
        flat = pack.master_weights()
        if dp is not None and dp.shard and pack.layout.mixed:
            dp.send_masters(pack.index, flat)
        return flat
    assert dp is not None and built.owners
    return dp.receive_masters(pack.index, built.owners[pack.index], pack.layout.g_bytes)


def _pack_values(holdings: Holdings, built: Built, pack: Pack
                 ) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Every entry of ``pack`` with its value (a trainable one's master), as views of its home
    buffers, or of one chunk of its files at a time."""
    layout = pack.layout
    host = holdings.tiers[Loc.HOST]
    sharded = holdings.dp is not None and holdings.dp.shard and layout.mixed
    if pack.home_w is not None or sharded:  # (the masters may come from their owner rank)
        flat, m_flat = pack.home_weights(), masters(holdings, built, pack)
        if holdings.device.type == "cuda":
            torch.cuda.synchronize(holdings.device)
        for e in layout.entries:
            yield e, (e.gview(m_flat) if e.trainable else e.view(flat))
        return
    assert pack.store is not None
    for chunk in pack.chunks:  # one chunk's weights (and fp32 masters) in memory at a time
        w, free_w = host_buffer(host, chunk.w_bytes, f"weights of pack {pack.index} "
                                f"(chunk {chunk.index}) read back")
        free = [free_w]
        try:
            pack.store.read(pack.key("W", chunk.index), w).synchronize()
            m = None
            if layout.mixed and chunk.params:
                m, free_m = host_buffer(host, chunk.m_bytes, f"master weights of pack "
                                        f"{pack.index} (chunk {chunk.index}) read back")
                free.append(free_m)
                pack.store.read(pack.key("M", chunk.index), m).synchronize()
            for e in layout.entries:
                if chunk.w[0] <= e.offset < chunk.w[1]:
                    yield e, (e.gview(m, chunk.m[0]) if e.trainable and m is not None
                              else e.view(w, chunk.w[0]))
        finally:
            for f in free:
                f()


def _weights_unbuilt(holdings: Holdings, model_sd: dict[str, torch.Tensor],
                     keys: dict[int, list[str]]) -> Streamed:
    """Before the packs are built: the model's own values, layer by layer (a layer on the
    meta device materialized while its tensors are produced; from ``weights=``, one tensor
    at a time)."""
    chain, materializer = holdings.chain, holdings.materializer
    owner: dict[int, int] = {}
    for i, layer in enumerate(chain.layers):
        for t in [*layer.parameters(), *layer.buffers()]:
            owner.setdefault(id(t), i)
    groups: dict[int | None, list[tuple[str, torch.Tensor]]] = {}
    seen: set[int] = set()
    for v in model_sd.values():
        if id(v) not in seen:
            seen.add(id(v))
            groups.setdefault(owner.get(id(v)), []).extend((k, v) for k in keys[id(v)])
    order = sorted(groups.items(), key=lambda item: len(chain.layers) if item[0] is None
                   else item[0])
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for _, items in order for k, v in items]

    def produce() -> Iterator[Item]:
        for i, items in order:
            whole = i is not None and materializer.meta and materializer.files is None
            with materializer.layer(i) if whole else contextlib.nullcontext():  # type: ignore[arg-type]
                for k, v in items:
                    yield k, materializer.value(v)

    return Streamed(specs, produce)


def optimizer(holdings: Holdings, built: Built | None
              ) -> tuple[Streamed, dict[str, Any], list[Any]]:
    """The optimizer state as :meth:`harmony.training.optimizer_state.OptimizerState.read`
    gives it, its tensors streamed: per pack (an NVMe-homed pack chunk by chunk, each chunk's
    state read from its file only while its tensors are produced),
    ``"<parameter key>/<state name>"``."""
    scalars: dict[str, Any] = {}
    groups: list[Any] = []
    specs: list[TensorSpec] = []
    if built is None:
        return Streamed(specs, lambda: iter(())), scalars, groups
    host = holdings.tiers[Loc.HOST]
    plan: list[tuple[Pack, int | None, list[tuple[str, Any]]]] = []  # pack, chunk, (key, t)
    for pack in built.packs:
        keys = holdings.param_keys(pack)
        held = {id(p) for g in pack.optimizer.param_groups for p in g["params"]}
        shapes = {id(t): shape for lay in pack.k_layouts if lay is not None
                  for t, _, shape in lay}
        chunks: list[tuple[int | None, list[int]]] = [
            (c.index, list(c.params)) for c in pack.chunks] if pack.home is Loc.NVME \
            else [(None, list(range(len(pack.masters))))]
        for c, params in chunks:
            items = []
            for i in params:
                m = pack.masters[i]
                if id(m) not in held:
                    continue
                for name, val in pack.optimizer.state.get(m, {}).items():
                    key = f"{keys[id(m)]}/{name}"
                    if isinstance(val, torch.Tensor):
                        shape = tuple(shapes.get(id(val), val.shape))
                        specs.append(TensorSpec(key, val.dtype, shape))
                        items.append((key, val))
                    else:
                        scalars[key] = val
            plan.append((pack, c, items))
        groups.append([{k: v for k, v in g.items() if k != "params"}
                       for g in pack.optimizer.param_groups])

    def produce() -> Iterator[Item]:
        for pack, c, items in plan:
            if c is None or pack.k_layouts[c] is None or not items:
                yield from ((k, t.detach()) for k, t in items)
                continue
            assert pack.store is not None
            k, free = host_buffer(host, pack.k_sizes[c], f"optimizer state of pack "
                                  f"{pack.index} (chunk {c}) read back")
            try:
                pack.store.read(pack.key("K", c), k).synchronize()
                pack.bind_state(c, k)
                yield from ((key, t.detach()) for key, t in items)
            finally:
                pack.bind_state(c, None)
                free()

    return Streamed(specs, produce), scalars, groups
