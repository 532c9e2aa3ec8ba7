"""The flat layout of a pack: every parameter and buffer at an aligned offset of one buffer.

A pack's weights move as one flat buffer (one copy per swap, one file per pack on NVMe). Trainable
parameters come first, so their gradients use the same offsets in a shorter flat buffer; then
frozen parameters, then buffers.
"""

from __future__ import annotations

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
    dtype: torch.dtype
    trainable: bool

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This entry's view of a flat uint8 buffer laid out like the pack."""
        return flat[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


class Layout:
    """Offsets of every parameter and buffer of some layers in one flat buffer.

    Attributes:
        entries: parameters (trainable first, then frozen) then buffers, each once.
        w_bytes: size of the flat weight buffer. g_bytes: size of the trainable prefix.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
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
        params.sort(key=lambda e: not e[3])  # stable: trainable first
        self.entries: list[Entry] = []
        offset = 0
        self.g_bytes = 0
        for mod, name, t, trainable in params + buffers:
            self.entries.append(Entry(mod, name, t, offset, t.shape, t.dtype, trainable))
            offset = _align(offset + t.numel() * t.element_size())
            if trainable:
                self.g_bytes = offset
        self.w_bytes = offset
        self.trainable = [e for e in self.entries if e.trainable]
        self.buffers = [e for e in self.entries if not isinstance(e.tensor, nn.Parameter)]

    def pack_into(self, flat: torch.Tensor) -> None:
        """Copy the entries' current values into ``flat``."""
        for e in self.entries:
            e.view(flat).copy_(e.tensor.detach())

    def bind(self, flat: torch.Tensor | None) -> None:
        """Point every entry's ``.data`` at its view of ``flat`` (None: at an empty tensor)."""
        for e in self.entries:
            if flat is None:
                e.tensor.data = torch.empty(0, dtype=e.dtype, device=e.tensor.device)
            else:
                e.tensor.data = e.view(flat)
