"""The compute tasks: a pack's forward (``F p.m``, ``F p.m-l``) and backward (``B p.m``)
over one micro-batch or a group of them (:class:`Compute`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from harmony.model.buffers import buffers_unchanged
from harmony.model.chain import as_tuple, call, checked_loss
from harmony.model.rng import layer_rng
from harmony.runtime.gradients import Gradients
from harmony.runtime.options import RuntimeOptions
from harmony.runtime.pack import Pack
from harmony.runtime.slot import Value
from harmony.runtime.step import StepState
from harmony.runtime.updates import UpdatePath
from harmony.runtime.values import Values
from harmony.runtime.weights import DeviceWeights
from schedules.task import Kind, Ref, Task
from swap.tier import Tier


class Compute:
    """Runs packs' layers on the device: forwards, recomputes and backwards.

    Args:
        packs: the packs. dev: the device tier (charged for working memory and graphs).
        values: the step's values. grads: the packs' gradients. weights: their device
        copies. updates: the update path (an NVMe pack's update is staged behind its
        backward). options: the runtime's.

    Example::

        compute.forward(Task(Op.FWD, 0, 0), step)
        compute.backward(Task(Op.BWD, 0, 0), step)
    """

    def __init__(self, packs: Sequence[Pack], dev: Tier, values: Values, grads: Gradients,
                 weights: DeviceWeights, updates: UpdatePath, options: RuntimeOptions) -> None:
        self._packs, self._dev, self._values, self._grads = packs, dev, values, grads
        self._weights, self._updates, self._options = weights, updates, options

    def _run_layers(self, step: StepState, p: int, m: int, value: tuple[torch.Tensor, ...],
                    single: bool) -> tuple[object, bool]:
        pack, options = self._packs[p], self._options
        out: object = value[0] if single else value
        for j, layer in enumerate(pack.layers):
            idx = pack.first_layer + j
            with layer_rng(options.seed, step.step, m + step.mb_offset, idx, options.device), \
                    options.precision.autocast(options.device):
                out = call(layer, value)
            value = as_tuple(out, f"layer {idx} ({type(layer).__name__})")
        return out, not isinstance(out, tuple)

    def _leaf(self, p: int, value: Value) -> tuple[torch.Tensor, ...]:
        if p == 0 and not self._options.input_grad:
            return tuple(t for t in value if t is not None)
        return tuple(t.detach().requires_grad_(t.is_floating_point())  # type: ignore[union-attr]
                     for t in value)

    def forward(self, task: Task, step: StepState) -> None:
        """``F p.m`` (or a group ``F p.m-l``): the pack's layers over the micro-batch's
        stashed input, producing the next pack's input (and, without recompute, keeping
        the autograd graph for the backward)."""
        if task.last is not None:
            return self._forward_group(task, step)
        p, m = task.pack, task.mb
        assert m is not None
        self._weights.wait(p)
        slot = self._values.slot(Ref(Kind.X, p, m))
        value = self._values.read(Ref(Kind.X, p, m))
        work = step.sizes.work[p][m]
        self._dev.charge(work, f"working memory of F{p}.{m}")
        try:
            if step.schedule.recompute:
                with torch.no_grad():
                    out, single = self._run_layers(step, p, m, value, slot.single)  # type: ignore[arg-type]
            else:
                leaf = self._leaf(p, value)
                if p == 0:  # the graph outlives X0.m's device buffer, which goes back to the pool
                    leaf = tuple(t.clone() for t in leaf)
                with torch.enable_grad():
                    out, single = self._run_layers(step, p, m, leaf, slot.single)
                s = step.sizes.s[p][m]
                self._dev.charge(s, f"autograd graph of F{p}.{m}")
                self._values.keep_graph(Ref(Kind.S, p, m), leaf, s, as_tuple(out, f"pack {p}"))
        finally:
            self._dev.uncharge(work)
        step.forwarded.add((p, m))
        self._weights.keep_buffers(p)
        self._values.produce(Ref(Kind.X, p + 1, m), as_tuple(out, f"pack {p}"), single)

    def _forward_group(self, task: Task, step: StepState) -> None:
        """One forward over several micro-batches (``F p.m-l``): their inputs concatenated,
        each layer of the pack run once over all their samples, and the output split into
        the next pack's input per micro-batch. The planner groups only packs whose layers
        draw no random numbers, change no buffers and treat samples independently
        (:mod:`harmony.planning.groups`), so this equals a forward per micro-batch up to rounding;
        each micro-batch's backward then recomputes from its own stashed input as usual."""
        p, mbs = task.pack, task.mbs
        self._weights.wait(p)
        refs = [Ref(Kind.X, p, m) for m in mbs]
        values = [tuple(t for t in self._values.read(r) if t is not None) for r in refs]
        counts = [v[0].shape[0] for v in values]
        # The group's working memory (its layers' at all its samples, and the concatenated
        # input) stays charged until every micro-batch's output has its own storage.
        work = step.sizes.forward_work(p, mbs)
        self._dev.charge(work, f"working memory of {task}")
        try:
            with torch.no_grad():
                # (the concatenated input is only _run_layers' to hold: freed after a layer)
                out, single = self._run_layers(step, p, mbs[0], tuple(
                    torch.cat(parts) for parts in zip(*values)),
                    self._values.slot(refs[0]).single)
                parts = [t.split(counts) for t in as_tuple(out, f"pack {p}")]
                del out
                for i, m in enumerate(mbs):
                    # A copy per micro-batch: each slot is freed on its own, and a view would
                    # keep the whole group's output alive.
                    self._values.produce(Ref(Kind.X, p + 1, m),
                                         tuple(t[i].clone() for t in parts), single)
        finally:
            self._dev.uncharge(work)
        step.forwarded.update((p, m) for m in mbs)
        self._weights.keep_buffers(p)

    def backward(self, task: Task, step: StepState) -> None:
        """``B p.m``: the pack's backward for the micro-batch (recomputing its forward from
        the stashed input unless the forward kept its graph), adding into the pack's
        gradients and producing its input's gradient ``D p.m`` for the pack before."""
        p, m = task.pack, task.mb
        assert m is not None
        last = p == step.schedule.packs - 1
        self._weights.wait(p)
        if p not in step.grads:
            if p in step.stage_early:  # (its update's first NVMe reads, behind this backward)
                self._updates.stage(p)
            self._grads.new(p)
        else:
            self._grads.read(p)
        x_ref = Ref(Kind.X, p, m)
        work = step.sizes.work[p][m]
        self._dev.charge(work, f"working memory of B{p}.{m}")
        # A recompute must not update the buffers a second time; they are restored only after
        # this micro-batch's backward, which may have saved them (see harmony.model.buffers).
        rerun = Ref(Kind.S, p, m) not in self._values and (p, m) in step.forwarded
        frozen = contextlib.ExitStack()
        if rerun:
            frozen.enter_context(buffers_unchanged(self._weights.changing(p)))
        try:
            s_slot = self._values.get(Ref(Kind.S, p, m))
            if s_slot is not None:
                leaf = s_slot.dev
                assert s_slot.outputs is not None
                outs = s_slot.outputs
            else:
                value = self._values.read(x_ref)
                leaf = self._leaf(p, value)
                with torch.enable_grad():
                    out, _ = self._run_layers(step, p, m, leaf, self._values.slot(x_ref).single)
                if not rerun:  # this was the micro-batch's only forward
                    self._weights.keep_buffers(p)
                if last:
                    self._loss(step, m, out)
                else:
                    outs = as_tuple(out, f"pack {p}")
            if not last:
                grads = self._values.read(Ref(Kind.D, p + 1, m))
                pairs = [(o, g) for o, g in zip(outs, grads)
                         if g is not None and o is not None and o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if p > 0 or self._options.input_grad:
                assert leaf is not None
                d = tuple(t.grad if t is not None else None for t in leaf)
                self._values.produce(Ref(Kind.D, p, m), d, False)
        finally:
            self._dev.uncharge(work)
            frozen.close()
        step.grads.add(p)

    def _loss(self, step: StepState, m: int, out: object) -> None:
        """The last pack's backward starts from micro-batch ``m``'s weighted loss."""
        options = self._options
        target = step.batch.target(m)
        with options.precision.autocast(options.device):
            loss = checked_loss(options.loss_fn, out, target)
        weighted = loss * step.data.weights[m]
        if options.precision.scaling:  # fp16: unscaled before the first update
            (weighted * options.precision.scale).backward()
        else:
            weighted.backward()
        step.loss += weighted.detach().double()
