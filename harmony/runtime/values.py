"""The step's values: stashed activations (X), their gradients (D) and autograd graphs kept
from a forward (S), each with its copies in one :class:`~harmony.runtime.slot.Slot`
(:class:`Values`; a pack's gradients, G, are :class:`harmony.runtime.gradients.Gradients`')."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch

from harmony.runtime.homes import Home
from harmony.runtime.slot import Slot, Value, nbytes
from schedules.simulate import link
from schedules.task import Loc, Ref
from swap.engine import SwapEngine
from swap.handle import GroupHandle, Handle
from swap.tier import Tier


class Values:
    """Every X, D and S value of the step, on the device and at its home.

    Args:
        dev: the device tier. homes: the home of each location. engine: the swap engine.
        foreign: the device buffers other owners hold (gradients, weights), which a value
            produced by compute must not share (see :meth:`produce`).

    Example::

        values.produce(Ref(Kind.X, 1, 0), (out,), single=True)
        values.swap_out(Ref(Kind.X, 1, 0), Loc.HOST)
        values.swap_in(Ref(Kind.X, 1, 0))
        x = values.read(Ref(Kind.X, 1, 0))
    """

    def __init__(self, dev: Tier, homes: Mapping[Loc, Home], engine: SwapEngine,
                 foreign: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._dev, self._homes, self._engine, self._foreign = dev, homes, engine, foreign
        self._slots: dict[Ref, Slot] = {}

    def __contains__(self, ref: Ref) -> bool:
        return ref in self._slots

    def slot(self, ref: Ref) -> Slot:
        """The copies of ``ref`` (KeyError: not a value of the step)."""
        return self._slots[ref]

    def get(self, ref: Ref) -> Slot | None:
        return self._slots.get(ref)

    def put_input(self, ref: Ref, value: Value, single: bool) -> Slot:
        """Make ``value`` (the caller's, in host memory or on the device) ``ref``'s home copy."""
        slot = self._slots[ref] = Slot(home=value, single=single, home_loc=Loc.HOST)
        return slot

    def read(self, ref: Ref) -> Value:
        """``ref`` on the device, once the copy filling it is done (for compute)."""
        slot = self._slots[ref]
        if slot.dev is None:
            raise AssertionError(f"{ref} is not on the device")
        slot.wait_dev(self._engine)
        return slot.dev

    def produce(self, ref: Ref, value: Value, single: bool) -> None:
        """Make ``value`` (compute produced it, or a pipeline rank received it) the device copy
        of ``ref``, charged to the device tier."""
        # A layer may pass an input through (a mask in a tuple), and autograd may hand back a
        # gradient it was given: such tensors live in buffers other values own, which go back
        # to the pool when those values are freed. The new value gets its own copy.
        owned = {b.untyped_storage().data_ptr() for s in self._slots.values() for b in s.dev_bufs}
        owned |= {b.untyped_storage().data_ptr() for b in self._foreign()}
        value = tuple(t.clone() if t is not None and t.untyped_storage().data_ptr() in owned
                      else t for t in value)
        n = nbytes(value)
        self._dev.charge(n, f"{ref}")
        self._slots[ref] = Slot(dev=value, dev_charged=n, single=single)

    def keep_graph(self, ref: Ref, leaf: tuple[torch.Tensor, ...], charged: int,
                   outputs: Value) -> None:
        """Keep a forward's autograd graph (S): its input leaves and outputs, ``charged``
        device bytes (charged by the caller), until the backward walks it."""
        self._slots[ref] = Slot(dev=leaf, dev_charged=charged, outputs=outputs)

    def swap_in(self, ref: Ref) -> None:
        """Start copying ``ref`` from its home to the device."""
        slot = self._slots[ref]
        assert slot.home is not None and slot.dev is None, ref
        # (written behind earlier: the host must see the bytes)
        slot.sync_home(self._engine, link(Loc.DEVICE, slot.home_loc))
        home = self._homes[slot.home_loc]
        dev: list[torch.Tensor | None] = []
        handles: list[Handle] = []
        name = link(slot.home_loc, Loc.DEVICE)
        for i, t in enumerate(slot.home):
            if t is None:
                dev.append(None)
                continue
            buf = self._dev.allocate(t.numel() * t.element_size(), f"{ref}")
            view = buf.view(t.dtype).view(t.shape)
            handles.append(home.load_value(slot, i, view, name, ref.kind.value))
            slot.dev_bufs.append(buf)
            dev.append(view)
        slot.dev, slot.dev_ready, slot.dev_link = tuple(dev), GroupHandle(handles), name

    def swap_out(self, ref: Ref, loc: Loc) -> None:
        """Start copying ``ref`` from the device to its home at ``loc``; the device copy goes
        once that copy has read it."""
        slot = self._slots[ref]
        assert slot.dev is not None, ref
        home = self._homes[loc]
        name = link(Loc.DEVICE, loc)
        slot.wait_dev(self._engine)
        slot.home_loc = loc
        stored: list[torch.Tensor | None] = []
        handles: list[Handle] = []
        for i, t in enumerate(slot.dev):
            if t is None:
                stored.append(None)
                continue
            view, handle = home.store_value(slot, str(ref), f"{ref}.{i}", t.detach(), name,
                                            ref.kind.value)
            handles.append(handle)
            stored.append(view)
        slot.home = tuple(stored)
        slot.home_ready = GroupHandle(handles)
        slot.home_users.append(slot.home_ready)
        slot.release_dev(self._dev, after=slot.home_ready)

    def drop(self, ref: Ref, home_too: bool) -> None:
        """Free ``ref``'s device copy (``~X``), and with ``home_too`` its home copy and the
        value itself (``!X``)."""
        slot = self._slots.get(ref)
        if slot is None:
            return
        slot.release_dev(self._dev, after=None)
        if home_too:
            self._homes[slot.home_loc].free_value(slot)
            del self._slots[ref]

    def device_buffers(self) -> list[torch.Tensor]:
        """The device buffers backing values (the pool's, given back when freed)."""
        return [b for s in self._slots.values() for b in s.dev_bufs]

    def abandon(self) -> None:
        """After a failed step: drop every value (errors of giving each back are the failed
        step's consequences, not raised here)."""
        for ref in list(self._slots):
            with contextlib.suppress(Exception):  # (more failed writes after a full disk)
                self.drop(ref, home_too=True)
            self._slots.pop(ref, None)
