"""Chunks of a pack's update: consecutive parameters whose weights and optimizer state are
streamed through host memory together when the pack lives on NVMe.

A pack homed on NVMe keeps each chunk in files of its own (``pack3.W.0``, ``pack3.M.0``,
``pack3.K.0``, ``pack3.W.1``, ...), so every read and write of a chunk starts at offset 0 of a
file and is aligned for direct I/O, and an update needs only a few chunks in host memory at a
time (see :mod:`harmony.runtime.chunked_update`). The split is a pure function of byte counts, so
the planner predicts the same chunks from a profile as the pack builds from its layout.

A chunk holds whole parameters: an optimizer steps each parameter from its own gradient and
state, so a chunk's update is the update of those parameters alone. A parameter larger than the
budget is a chunk by itself (splitting one would be valid only for element-wise optimizers).
Buffers follow the trainable parameters in the last chunk. Frozen parameters (a LoRA model's
base weights) are a last chunk of their own, marked ``frozen``: they are loaded with the rest of
the weights, but an update neither reads nor writes them.

>>> split_chunks([5, 5, 5, 12, 1], 10)
[range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
>>> split_chunks([5, 5, 5], None)
[range(0, 3)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from harmony.model.layout import Layout
from harmony.planning.sizes import parse_bytes


def parse_update_chunk(value: object, name: str = "update_chunk") -> int | str | None:
    """A chunk budget as users give it: None (each update holds its whole pack), ``"auto"``
    (the planner picks), or a positive size in bytes (an int, or a string such as
    ``"64MiB"``), returned as an int.

    Raises:
        ValueError: anything else; the message names the value and what to give.

    >>> parse_update_chunk("64MiB"), parse_update_chunk("auto"), parse_update_chunk(None)
    (67108864, 'auto', None)
    """
    if value is None or value == "auto":
        return value
    fix = (f"give {name} as a positive number of bytes (an int, or e.g. '64MiB'), 'auto' "
           "(the planner picks) or None (each update holds its whole pack)")
    try:
        n = parse_bytes(value, name)  # type: ignore[arg-type]
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{name}={value!r} is not a chunk size; {fix}")
    return n


# Bytes a parameter's optimizer state may take beyond ``k_ratio`` times its gradient bytes: the
# flat layout on NVMe aligns each state tensor to 64 bytes, and scalar state (AdamW's step) is
# not in the ratio, which is probed on a large parameter. Whole packs average it out; one
# chunk of a few parameters may not, so the planner adds it per parameter of a chunk.
STATE_SLACK = 64


def split_chunks(items: Sequence[float], budget: int | None) -> list[range]:
    """Consecutive runs of ``items`` (bytes each) of at most ``budget`` bytes together; an item
    larger than the budget is a run by itself. ``budget`` None: one run of all (at least one
    run, empty when there are no items)."""
    if budget is None or not items:
        return [range(0, len(items))]
    out, start, acc = [], 0, 0.0
    for i, n in enumerate(items):
        if i > start and acc + n > budget:
            out.append(range(start, i))
            start, acc = i, 0.0
        acc += n
    out.append(range(start, len(items)))
    return out


@dataclass(frozen=True)
class Chunk:
    """One chunk of a pack: trainable parameters ``params`` (indices into
    ``Layout.trainable``) and the byte ranges ``[start, stop)`` they take in the flat weights
    (``w``) and in the flat gradients and fp32 masters (``m``). The last chunk an update
    streams runs to ``Layout.frozen_start`` (the buffers come after the trainable
    parameters); the frozen parameters, if any, are a chunk of their own (``frozen``) to the
    end of the flat buffer, which updates leave alone.
    """

    index: int
    params: range
    w: tuple[int, int]
    m: tuple[int, int]
    frozen: bool = False

    @property
    def w_bytes(self) -> int:
        return self.w[1] - self.w[0]

    @property
    def m_bytes(self) -> int:
        return self.m[1] - self.m[0]


def item_bytes(w: Sequence[int], g: Sequence[int], tail: int, k_ratio: float) -> list[float]:
    """The bytes an update streams per trainable parameter (its weights ``w``, plus
    ``k_ratio`` times its gradient bytes ``g`` of optimizer state and, in mixed precision,
    fp32 masters, plus :data:`STATE_SLACK`), then ``tail`` bytes of buffers (if any)."""
    slack = STATE_SLACK if k_ratio > 0 else 0
    items = [wi + k_ratio * gi + slack for wi, gi in zip(w, g)]
    return items + [tail] if tail else items


def layout_chunks(layout: Layout, budget: int | None, k_ratio: float) -> list[Chunk]:
    """Split ``layout``'s parameters into chunks of at most ``budget`` bytes of weights plus
    ``k_ratio`` times their gradient bytes (optimizer state, and masters in mixed precision),
    the buffers with the last; then the frozen parameters, if any, as one ``frozen`` chunk.
    ``budget`` None: one chunk, the whole pack (and the frozen chunk)."""
    n = len(layout.trainable)
    tail_start, frozen_start = layout.tail_start, layout.frozen_start
    w_starts = [e.offset for e in layout.trainable] + [tail_start]
    m_starts = [e.g_offset for e in layout.trainable] + [layout.g_bytes]
    spans = layout.trainable_spans()
    w, g = [a for a, _ in spans], [b for _, b in spans]
    chunks = []
    if frozen_start > 0:  # (a pack of frozen parameters alone has nothing to update)
        runs = split_chunks(item_bytes(w, g, frozen_start - tail_start, k_ratio), budget)
        for c, run in enumerate(runs):
            first, last = min(run.start, n), min(run.stop, n)
            w_end = w_starts[last] if c + 1 < len(runs) else frozen_start
            chunks.append(Chunk(c, range(first, last), (w_starts[first], w_end),
                                (m_starts[first], m_starts[last])))
    if frozen_start < layout.w_bytes:
        chunks.append(Chunk(len(chunks), range(n, n), (frozen_start, layout.w_bytes),
                            (layout.g_bytes, layout.g_bytes), frozen=True))
    return chunks


def profile_chunks(params: Sequence[tuple[Sequence[tuple[int, int]], int, int]
                                    | tuple[Sequence[tuple[int, int]], int, int, int]],
                   budget: int | None, k_ratio: float) -> list[tuple[int, int]]:
    """The chunks an update of a pack of these layers streams: ``(weight bytes, optimizer
    bytes)`` per chunk, the second being ``k_ratio`` times the chunk's gradient bytes plus
    :data:`STATE_SLACK` per parameter (when ``k_ratio`` > 0). Frozen parameters are not
    part of them (their chunk is never read or written by an update).

    ``params``: per layer, ``(per trainable parameter (weight bytes, gradient bytes), the
    layer's weight bytes, its gradient bytes[, its frozen parameters' bytes])``; a layer with
    gradients but no parameter list counts as one parameter of all its bytes but the frozen
    ones. The
    pack's trainable parameters come first in its flat weights, then the layers' buffers (the
    tail), then the frozen parameters, as in :class:`Layout`.
    """
    w: list[int] = []
    g: list[int] = []
    tail = 0
    for per_param, w_bytes, g_bytes, *rest in params:
        frozen = rest[0] if rest else 0
        if not per_param:
            if g_bytes:  # its parameters unknown: one of all its bytes
                w.append(w_bytes - frozen)
                g.append(g_bytes)
            else:  # nothing trainable: its buffers
                tail += w_bytes - frozen
            continue
        w += [a for a, _ in per_param]
        g += [b for _, b in per_param]
        tail += w_bytes - frozen - sum(a for a, _ in per_param)
    if not w and not tail:
        return []
    runs = split_chunks(item_bytes(w, g, tail, k_ratio), budget)
    out = []
    for run in runs:
        cw = sum(w[i] for i in run if i < len(w)) + (tail if run.stop > len(w) else 0)
        mine = [i for i in run if i < len(g)]
        slack = STATE_SLACK * len(mine) if k_ratio > 0 else 0
        out.append((cw, int(math.ceil(k_ratio * sum(g[i] for i in mine))) + slack))
    return out
