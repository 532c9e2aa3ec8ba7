"""A pack's state: its layers, flat layout, home copy of the weights, and optimizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from harmony.layout import Layout
from schedules.task import Loc
from swap.nvme import NvmeStore
from swap.tier import Tier


@dataclass
class Pack:
    """Everything harmony keeps about one pack (one record, not parallel dicts).

    The home flat buffer ``home_w`` holds the master weights on the pack's home tier. When the
    home is the device, the layers' parameters are views of it for good; otherwise they are bound
    to a device copy while the pack is swapped in and to empty tensors in between, and the
    optimizer steps ``masters``: parameters that are views of ``home_w``.

    With the home on NVMe, ``home_w`` is None: the weights are the file ``w_key`` of ``store``,
    and the optimizer state lives in the file ``k_key``, laid out by ``k_layout`` once the first
    update has created it. Masters and optimizer state are bound to host buffers only around an
    update (see :meth:`bind_masters`, :meth:`bind_state`) and to empty tensors otherwise.
    """

    index: int
    first_layer: int
    layers: list[nn.Module]
    layout: Layout
    home: Loc
    home_tier: Tier
    home_w: torch.Tensor | None
    masters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    k_charged: int
    got_grad: list[bool] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    store: NvmeStore | None = None
    # (state tensor, offset, shape) of the optimizer state's flat layout on NVMe
    k_layout: list[tuple[torch.Tensor, int, torch.Size]] | None = None
    k_bytes: int = 0

    @property
    def w_key(self) -> str:
        return f"pack{self.index}.W"

    @property
    def k_key(self) -> str:
        return f"pack{self.index}.K"

    @staticmethod
    def build(index: int, first_layer: int, layers: list[nn.Module], home: Loc,
              home_tier: Tier,
              factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
              k_estimate: int, store: NvmeStore | None = None,
              untrained: frozenset[int] = frozenset()) -> Pack:
        """Move the layers' weights into a flat buffer at ``home`` and build the optimizer.

        ``untrained``: ids of trainable parameters the optimizer must not hold (copies of tied
        weights that another pack updates, see harmony/tied.py); they still get gradients.
        """
        layout = Layout(layers)
        home_w: torch.Tensor | None
        if home is Loc.NVME:
            if store is None:
                raise ValueError(f"pack {index} is placed on NVMe but there is no nvme_dir")
            staging = torch.empty(layout.w_bytes, dtype=torch.uint8)
            layout.pack_into(staging)
            store.write(f"pack{index}.W", staging).synchronize()
            home_tier.charge(layout.w_bytes, f"weights of pack {index}")
            home_w = None
        else:
            home_w = home_tier.allocate(layout.w_bytes, f"weights of pack {index}")
            layout.pack_into(home_w)
        if home is Loc.DEVICE:
            assert home_w is not None
            layout.bind(home_w)
            masters = [e.tensor for e in layout.trainable if isinstance(e.tensor, nn.Parameter)]
        else:
            layout.bind(None)
            masters = [nn.Parameter(e.view(home_w) if home_w is not None
                                    else torch.empty(0, dtype=e.dtype))
                       for e in layout.trainable]
        owned = [m for m, e in zip(masters, layout.trainable) if id(e.tensor) not in untrained]
        if not owned and masters:
            raise ValueError(
                f"pack {index} trains only copies of weights tied to an earlier pack "
                f"({[e.name for e in layout.trainable]}); its optimizer would hold nothing: "
                "put that layer in one layer with a neighbour that has parameters of its own")
        opt = factory(owned)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}; it must return "
                            "a torch.optim.Optimizer built over the parameters it is given")
        home_tier.charge(k_estimate, f"optimizer state of pack {index}")
        pack = Pack(index, first_layer, layers, layout, home, home_tier, home_w, masters, opt,
                    k_estimate, [False] * len(layout.trainable), store=store)
        for i, e in enumerate(layout.trainable):
            pack.hooks.append(e.tensor.register_post_accumulate_grad_hook(  # type: ignore[union-attr]
                lambda _p, i=i: pack._mark(i)))
        return pack

    def _mark(self, i: int) -> None:
        self.got_grad[i] = True

    # -- NVMe homes ---------------------------------------------------------------------------
    def bind_masters(self, flat: torch.Tensor | None) -> None:
        """Point the masters at views of a host copy of the weights (None: at empty tensors)."""
        for m, e in zip(self.masters, self.layout.trainable):
            m.data = e.view(flat) if flat is not None else torch.empty(0, dtype=e.dtype)

    def state_tensors(self) -> list[torch.Tensor]:
        """The optimizer's state tensors in a fixed order (by master, then by name)."""
        out = []
        for m in self.masters:
            state = self.optimizer.state.get(m, {})
            out += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
        return out

    def layout_state(self) -> None:
        """Lay the optimizer state out in one flat buffer (after the first update made it)."""
        offset, layout = 0, []
        for t in self.state_tensors():
            layout.append((t, offset, t.shape))
            offset = (offset + t.numel() * t.element_size() + 63) // 64 * 64
        self.k_layout, self.k_bytes = layout, offset

    def bind_state(self, flat: torch.Tensor | None, copy_in: bool = False) -> None:
        """Point the state tensors at views of ``flat`` (None: at empty tensors); with
        ``copy_in``, first copy their current values into ``flat``."""
        assert self.k_layout is not None
        for t, off, shape in self.k_layout:
            if flat is None:
                t.data = torch.empty(0, dtype=t.dtype)
                continue
            view = flat[off:off + shape.numel() * t.element_size()].view(t.dtype).view(shape)
            if copy_in:
                view.copy_(t)
            t.data = view

    def home_weights(self) -> torch.Tensor:
        """The master weights as a flat CPU buffer (read from NVMe when they live there)."""
        if self.home_w is not None:
            return self.home_w
        assert self.store is not None
        flat = torch.empty(self.layout.w_bytes, dtype=torch.uint8)
        self.store.read(self.w_key, flat).synchronize()
        return flat

    def settle_optimizer_bytes(self) -> None:
        """Replace the estimated optimizer-state charge with the bytes it really holds."""
        if self.k_layout is not None and self.home is Loc.NVME:
            real = self.k_bytes
        else:
            real = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                       for t in s.values() if isinstance(t, torch.Tensor))
        if real != self.k_charged:
            self.home_tier.uncharge(self.k_charged)
            self.home_tier.charge(real, f"optimizer state of pack {self.index}")
            self.k_charged = real

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
