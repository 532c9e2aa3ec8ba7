"""The flat layout of a pack: every parameter and buffer at an aligned offset of one buffer.

A pack's weights move as one flat buffer (one copy per swap, one file per pack on NVMe). Trainable
parameters come first, so their gradients use the same offsets in a shorter flat buffer; then
buffers, then frozen parameters, which never change: an update of a pack homed on NVMe reads and
writes the bytes before ``frozen_start`` only (see :mod:`harmony.planning.chunks`).

With mixed precision (see :mod:`harmony.model.precision`) an entry's weight dtype in the flat buffer
(``dtype``, the compute dtype) may differ from its own (``master_dtype``); gradients and master
weights then use a second layout of the trainable entries in ``master_dtype`` (``g_offset``).
In fp32 both layouts coincide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised copies


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Entry:
    """One parameter or buffer of a pack: where it lives in the flat buffer and what it is."""

    module: nn.Module
    name: str          # attribute name in ``module``
    tensor: torch.Tensor  # the Parameter or buffer object itself (its identity never changes)
    offset: int
    shape: torch.Size
    dtype: torch.dtype    # in the flat weight buffer (the compute dtype)
    trainable: bool
    master_dtype: torch.dtype  # the tensor's own dtype: of its gradient and master copy
    g_offset: int         # offset in the flat gradient (and master-weight) buffer

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def view(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        """This entry's view of a flat uint8 buffer laid out like the pack (or of a piece of
        one that starts at byte ``base`` of the layout)."""
        start = self.offset - base
        return flat[start:start + self.nbytes].view(self.dtype).view(self.shape)

    def gview(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        """This trainable entry's view of a flat gradient or master-weight buffer (or of a
        piece of one that starts at byte ``base``)."""
        n = self.shape.numel() * self.master_dtype.itemsize
        start = self.g_offset - base
        return flat[start:start + n].view(self.master_dtype).view(self.shape)


class Layout:
    """Offsets of every parameter and buffer of some layers in one flat buffer.

    Args:
        layers: the modules whose parameters and buffers are laid out.
        dtype_of: ``(module, name, tensor, trainable) -> dtype`` of an entry in the flat weight
            buffer (default: the tensor's own); see
            :func:`harmony.model.precision.Precision.dtype_of`.

    Attributes:
        entries: trainable parameters, buffers, then frozen parameters, each once.
        w_bytes: size of the flat weight buffer. g_bytes: size of the flat gradient buffer
            (the trainable prefix in fp32; the trainable entries in their own dtype otherwise).
        mixed: some trainable entry is held in a dtype other than its own.
    """

    def __init__(self, layers: list[nn.Module],
                 dtype_of: Callable[[nn.Module, str, torch.Tensor, bool], torch.dtype] | None
                 = None) -> None:
        seen: set[int] = set()
        params: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
        buffers: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
        for layer in layers:
            for mod in layer.modules():
                for name, p in mod.named_parameters(recurse=False):
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append((mod, name, p, p.requires_grad))
                for name, b in mod.named_buffers(recurse=False):
                    if b is not None and id(b) not in seen:
                        seen.add(id(b))
                        buffers.append((mod, name, b, False))
        trained = [e for e in params if e[3]]
        frozen = [e for e in params if not e[3]]
        self.entries: list[Entry] = []
        offset = 0
        g_offset = 0
        for mod, name, t, trainable in trained + buffers + frozen:
            dtype = t.dtype if dtype_of is None else dtype_of(mod, name, t, trainable)
            self.entries.append(Entry(mod, name, t, offset, t.shape, dtype, trainable, t.dtype,
                                      g_offset))
            offset = _align(offset + t.numel() * dtype.itemsize)
            if trainable:
                g_offset = _align(g_offset + t.numel() * t.element_size())
        self.w_bytes = offset
        self.g_bytes = g_offset
        self.trainable = [e for e in self.entries if e.trainable]
        self.buffers = [e for e in self.entries if not isinstance(e.tensor, nn.Parameter)]
        self.mixed = any(e.dtype != e.master_dtype for e in self.trainable)

    @property
    def tail_start(self) -> int:
        """Where the entries after the trainable ones (buffers, frozen parameters) begin."""
        n = len(self.trainable)
        return self.entries[n].offset if len(self.entries) > n else self.w_bytes

    @property
    def frozen_start(self) -> int:
        """Where the frozen parameters begin (``w_bytes`` without any): nothing from here on
        ever changes."""
        first = next((e for e in self.entries
                      if not e.trainable and isinstance(e.tensor, nn.Parameter)), None)
        return first.offset if first is not None else self.w_bytes

    def trainable_spans(self) -> list[tuple[int, int]]:
        """Per trainable entry, the bytes it takes in the flat weights and in the flat
        gradients, padding to the next entry included (what streaming it moves)."""
        w = [e.offset for e in self.trainable] + [self.tail_start]
        g = [e.g_offset for e in self.trainable] + [self.g_bytes]
        return [(w[i + 1] - w[i], g[i + 1] - g[i]) for i in range(len(self.trainable))]

    def pack_into(self, flat: torch.Tensor) -> None:
        """Copy the entries' current values into ``flat``."""
        for e in self.entries:
            e.view(flat).copy_(e.tensor.detach())

    def pack_masters(self, flat: torch.Tensor) -> None:
        """Copy the trainable entries' current values, in their own dtype, into ``flat``."""
        for e in self.trainable:
            e.gview(flat).copy_(e.tensor.detach())

    def bind(self, flat: torch.Tensor | None) -> None:
        """Point every entry's ``.data`` at its view of ``flat`` (None: at an empty tensor)."""
        for e in self.entries:
            if flat is None:
                e.tensor.data = torch.empty(0, dtype=e.dtype, device=e.tensor.device)
            else:
                e.tensor.data = e.view(flat)
