"""A pack's state: its layers, flat layout, home copy of the weights, and optimizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from harmony.layout import Layout
from schedules.task import Loc
from swap.tier import Tier


@dataclass
class Pack:
    """Everything harmony keeps about one pack (one record, not parallel dicts).

    The home flat buffer ``home_w`` holds the master weights on the pack's home tier. When the
    home is the device, the layers' parameters are views of it for good; otherwise they are bound
    to a device copy while the pack is swapped in and to empty tensors in between, and the
    optimizer steps ``masters``: parameters that are views of ``home_w``.
    """

    index: int
    first_layer: int
    layers: list[nn.Module]
    layout: Layout
    home: Loc
    home_tier: Tier
    home_w: torch.Tensor
    masters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    k_charged: int
    got_grad: list[bool] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    @staticmethod
    def build(index: int, first_layer: int, layers: list[nn.Module], home: Loc,
              home_tier: Tier, device: torch.device,
              factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
              k_estimate: int) -> Pack:
        """Move the layers' weights into a flat buffer at ``home`` and build the optimizer."""
        layout = Layout(layers)
        home_w = home_tier.allocate(layout.w_bytes, f"weights of pack {index}")
        layout.pack_into(home_w)
        if home is Loc.DEVICE:
            layout.bind(home_w)
            masters = [e.tensor for e in layout.trainable if isinstance(e.tensor, nn.Parameter)]
        else:
            layout.bind(None)
            masters = [nn.Parameter(e.view(home_w)) for e in layout.trainable]
        opt = factory(list(masters))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}; it must return "
                            "a torch.optim.Optimizer built over the parameters it is given")
        home_tier.charge(k_estimate, f"optimizer state of pack {index}")
        pack = Pack(index, first_layer, layers, layout, home, home_tier, home_w, masters, opt,
                    k_estimate, [False] * len(layout.trainable))
        for i, e in enumerate(layout.trainable):
            pack.hooks.append(e.tensor.register_post_accumulate_grad_hook(  # type: ignore[union-attr]
                lambda _p, i=i: pack._mark(i)))
        _ = device
        return pack

    def _mark(self, i: int) -> None:
        self.got_grad[i] = True

    def settle_optimizer_bytes(self) -> None:
        """Replace the estimated optimizer-state charge with the bytes it really holds."""
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
