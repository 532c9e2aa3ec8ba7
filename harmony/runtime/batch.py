"""One step's micro-batches on their way to the device: :class:`Batch`.

Copies to a GPU read pinned memory only: where the host tier is pinned (CUDA), the step's
inputs and targets are first copied into host-tier buffers, from which the asynchronous copies
to the device read them: such a copy must not read pageable memory, which the caller may change
or Python free while it runs. Each buffer goes back to the pool once the copy reading it is done.
"""

from __future__ import annotations

import torch

from harmony.runtime.options import StepData
from harmony.runtime.values import Values
from schedules.simulate import link
from schedules.task import Kind, Loc, Ref
from swap.engine import SwapEngine
from swap.tier import Tier


class Batch:
    """The step's inputs (the home copies of ``X0.m``) and targets.

    Args:
        data: the step's micro-batches. host: the host tier. engine: the swap engine.
        device: the compute device.

    Example::

        batch = Batch(data, host, engine, device)
        batch.put_inputs(values)
        batch.stage(values)        # (on CUDA)
        y = batch.target(m)        # micro-batch m's targets on the device
    """

    def __init__(self, data: StepData, host: Tier, engine: SwapEngine,
                 device: torch.device) -> None:
        self.data, self._host, self._engine, self._device = data, host, engine, device
        # micro-batch -> its targets staged in host memory (a view, and its pool buffer)
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put_inputs(self, values: Values) -> None:
        """Make each micro-batch's inputs the home copy of ``X0.m`` (the caller's tensors)."""
        for m, x in enumerate(self.data.inputs):
            values.put_input(Ref(Kind.X, 0, m), x, self.data.single_input)

    def _staged(self, t: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._host.allocate(t.numel() * t.element_size(), what)
        view = buf.view(t.dtype).view(t.shape)
        self._engine.host_write(view, what)
        view.copy_(t)
        return view, buf

    def stage(self, values: Values) -> None:
        """Copy the inputs and targets in host memory into host-tier buffers (the inputs'
        become the home copies of ``X0.m``)."""
        for m, x in enumerate(self.data.inputs):
            slot = values.slot(Ref(Kind.X, 0, m))
            home: list[torch.Tensor | None] = []
            for i, t in enumerate(x):
                if t.device.type != "cpu":  # (already on the device)
                    home.append(t)
                    continue
                view, buf = self._staged(t, f"input {i} of micro-batch {m}")
                home.append(view)
                slot.home_bufs.append(buf)
            slot.home = tuple(home)
        for m, y in enumerate(self.data.targets):
            if y.device.type == "cpu":
                self.staged[m] = self._staged(y, f"targets of micro-batch {m}")

    def target(self, m: int) -> torch.Tensor:
        """Micro-batch ``m``'s targets on the device (from their staged host buffer, if any,
        which goes back to the pool once the copy is done)."""
        staged = self.staged.pop(m, None)
        if staged is None:  # (on the device already, or the device is the CPU)
            return self.data.targets[m].to(self._device)
        view, buf = staged
        target = torch.empty_like(view, device=self._device)
        name = link(Loc.HOST, Loc.DEVICE)
        handle = self._engine.copy(target, view, name, "T")
        self._engine.wait(handle, name)
        self._host.release(buf, after=handle)
        return target

    def abandon(self) -> None:
        """After a failed step: give back the targets staged and never copied."""
        for _, buf in self.staged.values():
            self._host.release(buf)
        self.staged.clear()
