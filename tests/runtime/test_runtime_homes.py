"""Homes (harmony/runtime/homes.py): a tier's buffers and NVMe files hold values and packs'
weights behind one interface, and both give back what was put there, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from harmony.runtime.homes import Home, homes
from harmony.runtime.nvme_io import NvmeIO
from harmony.runtime.pack import Pack
from harmony.runtime.slot import Slot
from schedules.simulate import link
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.nvme import NvmeStore
from swap.stats import Stats
from swap.tier import Tier


@pytest.fixture
def setting(tmp_path: Path) -> Iterator[tuple[dict[Loc, Tier], SwapEngine, NvmeIO,
                                              dict[Loc, Home]]]:
    tiers = {Loc.DEVICE: Tier("device", torch.device("cpu")),
             Loc.HOST: Tier("host", torch.device("cpu")),
             Loc.NVME: Tier("nvme", torch.device("cpu"))}
    engine = SwapEngine(torch.device("cpu"), Stats())
    engine.watch(tiers.values(), device=tiers[Loc.DEVICE])
    with NvmeStore(tmp_path) as store:
        io = NvmeIO(store, engine, tiers[Loc.HOST])
        yield tiers, engine, io, homes(tiers, engine, io)
        io.wait_writes()
        engine.synchronize_all()
        engine.close()


@pytest.mark.parametrize("loc", [Loc.HOST, Loc.NVME])
def test_a_value_comes_back_as_it_went_home(setting: tuple, loc: Loc) -> None:
    tiers, engine, io, home_of = setting
    store = io.store
    home = home_of[loc]
    value = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    slot = Slot(home_loc=loc)
    stored, handle = home.store_value(slot, "X1.0", "X1.0.0", value, link(Loc.DEVICE, loc), "X")
    assert stored.shape == value.shape and stored.dtype == value.dtype
    slot.home, slot.home_ready = (stored,), handle
    slot.home_users.append(handle)
    slot.sync_home(engine, link(Loc.DEVICE, loc))
    back = torch.empty_like(value)
    engine.synchronize(home.load_value(slot, 0, back, link(loc, Loc.DEVICE), "X"),
                       link(loc, Loc.DEVICE))
    assert torch.equal(back, value)
    assert tiers[loc].used == value.numel() * value.element_size()
    assert ("X1.0.0" in store) == (loc is Loc.NVME)
    home.free_value(slot)
    engine.synchronize_all()
    tiers[loc].drain()
    assert tiers[loc].used == 0
    assert "X1.0.0" not in store


def _pack(loc: Loc, tiers: dict[Loc, Tier], store: NvmeStore | None) -> Pack:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)]
    return Pack.build(0, 0, layers, loc, tiers[loc],
                      lambda ps: torch.optim.SGD(ps, lr=0.1), 0, store,
                      staging=tiers[Loc.HOST])


@pytest.mark.parametrize("loc", [Loc.HOST, Loc.NVME])
def test_weights_load_and_a_written_entry_is_read_back(setting: tuple, loc: Loc) -> None:
    tiers, engine, io, home_of = setting
    pack = _pack(loc, tiers, io.store)
    want = pack.home_weights().clone()
    dev = torch.empty(pack.layout.w_bytes, dtype=torch.uint8)
    name = link(loc, Loc.DEVICE)
    engine.synchronize(home_of[loc].load_weights(pack, dev, name, None), name)
    assert torch.equal(dev, want)
    # An entry's new value (as a tied copy's refresh writes it) lands in the home weights.
    entry = pack.layout.trainable[0]
    new = torch.full(entry.shape, 3.0)
    home_of[loc].write_entry(pack, entry, new, Loc.HOST)
    engine.synchronize_all()
    io.wait_writes()
    assert torch.equal(entry.view(pack.home_weights()), new)
    rest = [e for e in pack.layout.entries if e is not entry]
    assert all(torch.equal(e.view(pack.home_weights()), e.view(want)) for e in rest)
    pack.release()
