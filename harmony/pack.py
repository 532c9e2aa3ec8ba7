"""A pack's state: its layers, flat layout, home copy of the weights, and optimizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from harmony.layout import Layout
from harmony.precision import Precision
from schedules.task import Loc
from swap.nvme import NvmeStore
from swap.tier import Tier


class NothingToTrain(torch.optim.Optimizer):
    """The optimizer of a pack with no trainable parameters: no parameter groups, no state,
    and a step that does nothing (learning-rate schedulers accept it)."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {})
        self.param_groups = []

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


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

    Mixed precision (``layout.mixed``, see :mod:`harmony.precision`): ``home_w`` holds W in the
    compute dtype and the masters are fp32 views of a separate flat buffer ``home_m`` on the
    same tier, counted as K (on NVMe: the file ``m_key``); :meth:`refresh_weights` writes them
    back into W after an update. While ``grad_sink`` is set, each micro-batch's gradients are
    added into it (fp32, laid out by ``Entry.gview``) instead of accumulating on the parameters.
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
    home_m: torch.Tensor | None = None  # mixed precision: fp32 masters (None: in W, or on NVMe)
    grad_sink: torch.Tensor | None = None  # mixed precision: the fp32 G being accumulated
    untrained: frozenset[int] = frozenset()  # ids of tied copies another pack updates
    owned: bool = True  # False: another data-parallel rank owns its optimizer (and masters)

    @property
    def m_key(self) -> str:
        return f"pack{self.index}.M"

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
              precision: Precision | None = None,
              untrained: frozenset[int] = frozenset(), owned: bool = True) -> Pack:
        """Move the layers' weights into a flat buffer at ``home`` and build the optimizer.

        ``k_estimate`` counts the optimizer state and, in mixed precision, the fp32 masters
        (allocated here, so only the rest is charged as an estimate). ``untrained``: ids of
        trainable parameters the optimizer must not hold (copies of tied weights that another
        pack updates, see harmony/tied.py); they still get gradients. ``owned`` False: another
        data-parallel rank owns this pack's optimizer (sharded optimizer), so no optimizer
        state and, in mixed precision, no fp32 masters are kept here.
        """
        layout = Layout(layers, precision.dtype_of if precision is not None else None)
        if home is Loc.NVME and store is None:
            raise ValueError(f"pack {index} is placed on NVMe but there is no nvme_dir")

        def at_home(key: str, nbytes: int, fill: Callable[[torch.Tensor], None],
                    what: str) -> torch.Tensor | None:
            """A flat buffer at home filled by ``fill``; on NVMe, the file ``key`` (None)."""
            if home is not Loc.NVME:
                buf = home_tier.allocate(nbytes, what)
                fill(buf)
                return buf
            assert store is not None
            staging = torch.empty(nbytes, dtype=torch.uint8)
            fill(staging)
            store.write(key, staging).synchronize()
            home_tier.charge(nbytes, what)
            return None

        home_m: torch.Tensor | None = None
        if layout.mixed and not owned:  # another rank keeps the masters
            k_estimate = 0
        elif layout.mixed:  # fp32 masters, from the fp32 weights before they are rebound
            home_m = at_home(f"pack{index}.M", layout.g_bytes, layout.pack_masters,
                             f"master weights of pack {index}")
            k_estimate = max(0, k_estimate - layout.g_bytes)
        home_w = at_home(f"pack{index}.W", layout.w_bytes, layout.pack_into,
                         f"weights of pack {index}")
        if layout.mixed:
            layout.bind(home_w if home is Loc.DEVICE else None)
            masters = [nn.Parameter(e.gview(home_m) if home_m is not None
                                    else torch.empty(0, dtype=e.master_dtype))
                       for e in layout.trainable]
        elif home is Loc.DEVICE:
            assert home_w is not None
            layout.bind(home_w)
            masters = [e.tensor for e in layout.trainable if isinstance(e.tensor, nn.Parameter)]
        else:
            layout.bind(None)
            masters = [nn.Parameter(e.view(home_w) if home_w is not None
                                    else torch.empty(0, dtype=e.dtype))
                       for e in layout.trainable]
        # A pack with nothing of its own to train (activations, frozen layers, only copies of
        # tied weights, another rank's pack) gets a stand-in: optimizers refuse an empty
        # parameter list.
        mine = [m for m, e in zip(masters, layout.trainable) if id(e.tensor) not in untrained]
        opt = factory(mine) if mine and owned else NothingToTrain()
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}; it must return "
                            "a torch.optim.Optimizer built over the parameters it is given")
        home_tier.charge(k_estimate, f"optimizer state of pack {index}")
        pack = Pack(index, first_layer, layers, layout, home, home_tier, home_w, masters, opt,
                    k_estimate, [False] * len(layout.trainable), store=store, home_m=home_m,
                    untrained=untrained, owned=owned)
        for i, e in enumerate(layout.trainable):
            pack.hooks.append(e.tensor.register_post_accumulate_grad_hook(  # type: ignore[union-attr]
                lambda _p, i=i: pack._mark(i)))
        return pack

    def _mark(self, i: int) -> None:
        self.got_grad[i] = True
        if self.grad_sink is not None:  # mixed precision: accumulate in fp32, off the param
            e = self.layout.trainable[i]
            assert e.tensor.grad is not None
            e.gview(self.grad_sink).add_(e.tensor.grad)
            e.tensor.grad = None

    def refresh_weights(self, flat: torch.Tensor) -> None:
        """Mixed precision: copy the masters, rounded to the compute dtype, into W ``flat``
        (not the copies of tied weights: their owner's update writes those)."""
        with torch.no_grad():
            for m, e in zip(self.masters, self.layout.trainable):
                if id(e.tensor) not in self.untrained:
                    e.view(flat).copy_(m)

    # -- NVMe homes ---------------------------------------------------------------------------
    def bind_masters(self, flat: torch.Tensor | None) -> None:
        """Point the masters at views of a host copy of the weights (None: at empty tensors)."""
        for m, e in zip(self.masters, self.layout.trainable):
            m.data = e.gview(flat) if flat is not None else torch.empty(0, dtype=e.master_dtype)

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

    def master_weights(self) -> torch.Tensor:
        """The master weights as a flat CPU-readable buffer laid out by ``Entry.gview``: the
        weights themselves in fp32, the fp32 masters in mixed precision (read from NVMe when
        they live there)."""
        if not self.layout.mixed:
            return self.home_weights()
        if self.home_m is not None:
            return self.home_m
        assert self.store is not None
        flat = torch.empty(self.layout.g_bytes, dtype=torch.uint8)
        self.store.read(self.m_key, flat).synchronize()
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

    def release(self) -> None:
        """Give this pack's home bytes back to its tier (and delete its files): the layers'
        parameters are left bound to empty tensors, so the caller restores their values."""
        self.close()
        self.layout.bind(None)
        if self.home_w is not None:
            self.home_tier.release(self.home_w)
            self.home_w = None
        else:
            self.home_tier.uncharge(self.layout.w_bytes)
        if self.layout.mixed and self.owned:  # the fp32 masters: a buffer at home, or a file
            if self.home_m is not None:
                self.home_tier.release(self.home_m)
                self.home_m = None
            else:
                self.home_tier.uncharge(self.layout.g_bytes)
        self.home_tier.uncharge(self.k_charged)
        self.k_charged = 0
        if self.store is not None:
            for key in (self.w_key, self.k_key, self.m_key):
                if key in self.store:
                    self.store.delete(key)
        self.optimizer.state.clear()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
