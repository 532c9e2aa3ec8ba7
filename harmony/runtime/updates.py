"""The runtime's update tasks: a pack's optimizer step where its optimizer state lives.

``U p`` steps pack ``p``'s optimizer on its gradients: on the device, on the host (the masters
in fp32, the gradients read where the backward left them) or streamed chunk by chunk from NVMe
(:mod:`harmony.runtime.chunked_update`). Before the step's first update the runtime checks the loss,
unscales fp16 gradients and clips the global norm. With ``overlap_updates`` a step runs on the
update worker (:mod:`harmony.runtime.update_worker`) and what follows it on the runtime's thread
when it is joined. The functions here take the :class:`harmony.runtime.runtime.Runtime` whose state
they use; :func:`update` is the task.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from harmony.model.precision import GradientOverflow, unscale_
from harmony.runtime.chunked_update import ChunkedUpdate
from schedules.simulate import link
from schedules.task import Kind, Loc, Ref, Task

if TYPE_CHECKING:  # the runtime imports this module
    from harmony.runtime.runtime import Runtime


class NonFiniteLoss(ValueError):
    """The batch's loss is NaN or infinite; raised before any pack is updated."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"step {step}: the loss is {loss}; no weight was changed. Lower the "
                         "learning rate or check the data, or pass nonfinite='skip' to skip "
                         "such steps")


def update(rt: Runtime, task: Task) -> None:
    """Run ``U p``: the checks before the step's first update, then pack p's step."""
    p = task.pack
    rt._join_update()  # one update at a time, in the schedule's order
    if not rt.updated and rt.dp is not None:
        rt.loss = rt.dp.reduce_loss(rt.loss)  # every rank decides on the same loss
    if not rt.updated and not torch.isfinite(rt.loss):
        # Every micro-batch's loss is known before the first update in the generated
        # schedules, so refusing here leaves every weight as it was.
        raise NonFiniteLoss(rt.step, float(rt.loss))
    if not rt.updated and rt.precision.scaling:
        unscale(rt)
    if not rt.updated and rt.clip is not None:
        if rt.ties is not None:  # the norm counts a tied gradient once, summed
            rt.ties.merge_all(rt)
        clip_gradients(rt, *rt.clip)
    rt.updated.append(p)
    if not rt.owns(p):  # sharded optimizer: the owner steps it and broadcasts W
        rt._wait_allreduce(p)
        rt.grads.discard(p)
        return
    rt._w_arrived(p)  # the last step's send of these weights, before they change
    if rt.ties is not None:  # an owner sums the sharers' gradients; a sharer keeps its own
        rt.ties.before_update(rt, p)
    pack = rt.packs[p]
    slot = rt.values[Ref(Kind.G, p)]
    loc = rt.placement.update_loc(p)
    rt._wait_allreduce(p)
    if pack.home is Loc.NVME:
        return update_from_nvme(rt, p)
    if pack.layout.mixed:  # the fp32 masters step on the fp32 gradients
        for master, g in zip(pack.masters, rt._grad_views(p)):
            master.grad = g
    elif loc is Loc.DEVICE:
        for e, got in zip(pack.layout.trainable, pack.got_grad):
            if not got:
                e.tensor.grad = None
    else:
        assert slot.home is not None and slot.home[0] is not None
        if slot.home_ready is not None:  # the host optimizer reads these bytes
            rt.engine.synchronize(slot.home_ready, link(Loc.DEVICE, loc))
            slot.home_ready = None
        flat = slot.home[0]
        for master, e, got in zip(pack.masters, pack.layout.trainable, pack.got_grad):
            master.grad = e.gview(flat) if got else None
    if loc is not Loc.DEVICE:  # the host writes the masters (and W, in mixed precision)
        for master in pack.masters:
            rt.engine.host_write(master.detach(), f"master weights of pack {p} (its update)")
        if pack.layout.mixed and pack.home_w is not None:
            for e in pack.layout.trainable:
                rt.engine.host_write(e.view(pack.home_w),
                                     f"weights of pack {p} (refreshed by its update)")
    if rt.worker is not None and loc is Loc.HOST and rt.owners is None:
        # overlap_updates: the step runs behind what follows (harmony.runtime.update_worker)
        rt.worker.submit(p, partial(host_step, rt, p), partial(finish_host_update, rt, p))
        return
    host_step(rt, p)
    finish_host_update(rt, p)


def host_step(rt: Runtime, p: int) -> None:
    """Pack ``p``'s optimizer step (on the update worker, with overlap_updates): it reads
    the pack's gradients and writes its masters, optimizer state and, in mixed precision,
    its home weights, and nothing else."""
    pack = rt.packs[p]
    pack.optimizer.step()
    if pack.layout.mixed:
        assert pack.home_w is not None
        pack.refresh_weights(pack.home_w)


def finish_host_update(rt: Runtime, p: int) -> None:
    """What follows pack ``p``'s step, on the runtime's thread."""
    pack = rt.packs[p]
    for master in pack.masters:
        master.grad = None
    if rt.ties is not None:  # sharers' copies of this pack's tied weights (W refreshed)
        assert pack.home_w is not None
        rt.ties.after_update(rt, p, pack.home_w)
    pack.settle_optimizer_bytes()
    _gradients_done(rt, p)


def unscale(rt: Runtime) -> None:
    """fp16: divide every gradient by the loss scale; raise if any overflowed."""
    grads = [g for p in range(len(rt.packs)) if rt.owns(p)
             for g in rt._grad_views(p) if g is not None]
    overflow = unscale_(grads, rt.precision.scale)
    if rt.owners is not None and rt.dp is not None:  # each rank checked its packs
        overflow = rt.dp.all_sum(float(overflow)) > 0
    if overflow:
        raise GradientOverflow(f"step {rt.step}: a gradient overflowed at loss scale "
                               f"{rt.precision.scale:g}; the step is skipped")


def clip_gradients(rt: Runtime, max_norm: float, order: list[tuple[int, int]]) -> None:
    """Scale every pack's gradients as clip_grad_norm_ over the whole model would.

    The schedule runs every update after the last backward, so all gradients exist here.
    """
    views = {p: rt._grad_views(p) for p in range(len(rt.packs)) if rt.owns(p)}
    grads = [g for p, i in order if p in views and (g := views[p][i]) is not None]
    if rt.owners is not None and rt.dp is not None:
        # Sharded optimizer: each rank holds the summed gradients of its own packs; the
        # squares of their norms are summed over the ranks (float64) into the global norm.
        square = sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in grads)
        total = torch.tensor(rt.dp.all_sum(square) ** 0.5, dtype=torch.float32)
    elif not grads:
        return
    else:
        total = torch.nn.utils.get_total_norm(grads, 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for device in {g.device for g in grads}:
        torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))
    rt.grad_norm = float(total)


def update_from_nvme(rt: Runtime, p: int) -> None:
    """Stream pack ``p``'s update through host memory chunk by chunk (see
    :mod:`harmony.runtime.chunked_update`); a deferred update starts its reads now.

    With overlap_updates it runs on the update worker, from a reservation of the host
    bytes it holds (so it never waits for room the runtime's thread would free), unless
    that does not fit now, it is the pack's first update (its state's size is only
    estimated), or tied weights need the chunks' weights on this thread: then in line.
    """
    if p not in rt.staged:  # (staged behind its backward, unless the update is deferred)
        rt.staged[p] = ChunkedUpdate(rt, p)
    chunked = rt.staged[p]
    chunked.prepare()
    if rt.worker is not None and rt.owners is None and rt.ties is None \
            and chunked.reserve():
        rt.worker.submit(p, chunked.run, partial(finish_nvme_update, rt, p))
        return
    chunked.run()  # (after a failure, abandon() gives its buffers back)
    finish_nvme_update(rt, p)


def finish_nvme_update(rt: Runtime, p: int) -> None:
    """What follows pack ``p``'s chunked update, on the runtime's thread."""
    rt.staged.pop(p).finish()
    _gradients_done(rt, p)


def _gradients_done(rt: Runtime, p: int) -> None:
    """Pack ``p``'s step has read its gradients: they may go (now, if their deletion was
    deferred while an overlapped step read them)."""
    rt.grads.discard(p)
    if p in rt.deferred_g:
        rt.deferred_g.discard(p)
        rt._delete_grad(p)
