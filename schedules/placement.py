"""Placement: where each pack's weights, optimizer state and activations live between uses."""

from __future__ import annotations

from dataclasses import dataclass

from schedules.task import Kind, Loc


@dataclass(frozen=True)
class Placement:
    """The home tier of W, K (with G) and X (with D) for every pack.

    A value whose home is not ``Loc.DEVICE`` is swapped in before it is used on the device.
    The optimizer update of a pack runs on the device when its K lives there and on the host
    otherwise (K on NVMe is streamed through host memory for the update); gradients go where the
    update runs. Gradients of the input activation (D) live with the activations (X). In this
    version the weights' home is the optimizer state's home (the update writes them there).

    >>> Placement.uniform(3, Loc.HOST).w
    (<Loc.HOST: 'host'>, <Loc.HOST: 'host'>, <Loc.HOST: 'host'>)
    """

    w: tuple[Loc, ...]
    k: tuple[Loc, ...]
    x: tuple[Loc, ...]

    def __post_init__(self) -> None:
        if not (len(self.w) == len(self.k) == len(self.x)):
            raise ValueError(f"placement lists differ in length: w={len(self.w)}, "
                             f"k={len(self.k)}, x={len(self.x)}")
        for p, (w, k) in enumerate(zip(self.w, self.k)):
            if w is not k:
                raise ValueError(f"pack {p}: weights at {w.value} but optimizer state at "
                                 f"{k.value}; this version keeps both on the same tier")

    @property
    def packs(self) -> int:
        return len(self.w)

    @staticmethod
    def uniform(packs: int, wk: Loc, x: Loc | None = None) -> Placement:
        """Every pack's W and K at ``wk``, activations at ``x`` (default: the same)."""
        return Placement((wk,) * packs, (wk,) * packs, ((x or wk),) * packs)

    def home(self, kind: Kind, pack: int) -> Loc:
        """The home tier of a value of ``kind`` belonging to ``pack``."""
        if kind in (Kind.W,):
            return self.w[pack]
        if kind is Kind.K:
            return self.k[pack]
        if kind is Kind.G:
            return self.update_loc(pack)
        if kind in (Kind.X, Kind.D):
            return Loc.HOST if (kind is Kind.X and pack == 0) else self.x[pack]
        return Loc.DEVICE  # S: an autograd graph cannot leave the device

    def update_loc(self, pack: int) -> Loc:
        """Where the optimizer update of ``pack`` runs: the device, or the host."""
        return Loc.DEVICE if self.k[pack] is Loc.DEVICE else Loc.HOST

    def to_json(self) -> dict[str, list[str]]:
        return {name: [loc.value for loc in getattr(self, name)] for name in ("w", "k", "x")}

    @staticmethod
    def from_json(data: dict[str, list[str]]) -> Placement:
        return Placement(*(tuple(Loc(v) for v in data[name]) for name in ("w", "k", "x")))
