"""The update path: a pack's optimizer step where its optimizer state lives (:class:`UpdatePath`).

``U p`` steps pack ``p``'s optimizer on its gradients: on the device, on the host (the masters
in fp32, the gradients read where the backward left them) or streamed chunk by chunk from NVMe
(:mod:`harmony.runtime.chunked_update`). Before the step's first update the loss is checked,
fp16 gradients are unscaled and the global norm clipped (:mod:`harmony.runtime.checks`). With
``overlap_updates`` a step runs on the update worker (:mod:`harmony.runtime.update_worker`) and
what follows it on the runtime's thread when it is joined; the deletion of the gradients it
reads waits for that. With a sharded optimizer only the owner rank steps a pack and then
broadcasts its weights (:mod:`harmony.runtime.broadcast`). What the path keeps of one pack is
one :class:`PackUpdate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from harmony.runtime.broadcast import Broadcast
from harmony.runtime.checks import NonFiniteLoss, clip, unscale
from harmony.runtime.chunked_update import ChunkedUpdate
from harmony.runtime.gradients import Gradients
from harmony.runtime.homes import Home
from harmony.runtime.hooks import weights_arrived
from harmony.runtime.nvme_io import NvmeIO
from harmony.runtime.options import RuntimeOptions
from harmony.runtime.pack import Pack
from harmony.runtime.step import StepState
from harmony.runtime.tied import TiedCopies
from harmony.runtime.update_worker import UpdateWorker
from harmony.runtime.weights import DeviceWeights
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.handle import Handle
from swap.tier import Tier

__all__ = ["NonFiniteLoss", "PackUpdate", "UpdatePath"]


@dataclass
class PackUpdate:
    """One pack's update in flight.

    ``staged``: the update of a pack homed on NVMe, its first chunks being read (from its
    backward on, until it is done). ``sending``: sharded optimizer, a pack of one chunk on
    NVMe: its updated host weights and their write, until broadcast. ``deferred``: its
    gradients' deletion waits for its overlapped step, which reads them.
    """

    staged: ChunkedUpdate | None = None
    sending: tuple[torch.Tensor, Handle] | None = None
    deferred: bool = False


class UpdatePath:
    """Runs ``U p`` tasks and everything that must happen around them.

    Args:
        packs: the packs. tiers: the tier of each location. engine: the swap engine.
        io: the runtime's NVMe reads and writes. homes: the home of each location.
        grads: the packs' gradients. weights: their device copies. ties: tied weights (None:
        none). worker: the update worker (None: updates run in line). options: the runtime's.

    Example::

        path.update(p, step)        # U p
        path.delete_grads(p)        # !G p (after the overlapped step, if one reads them)
        path.end_step()             # the last overlapped step joined
    """

    def __init__(self, packs: Sequence[Pack], tiers: dict[Loc, Tier], engine: SwapEngine,
                 io: NvmeIO, homes: Mapping[Loc, Home], grads: Gradients,
                 weights: DeviceWeights, ties: TiedCopies | None, worker: UpdateWorker | None,
                 options: RuntimeOptions) -> None:
        self._packs, self._tiers, self._engine, self._io = packs, tiers, engine, io
        self._homes, self._grads, self._weights, self._ties = homes, grads, weights, ties
        self._worker, self._options = worker, options
        self._dp, self._owners = options.dp, options.owners
        self._broadcast = Broadcast(self._dp, self._owners, engine, tiers[Loc.HOST], io) \
            if self._dp is not None and self._owners is not None else None
        self._updates = [PackUpdate() for _ in packs]
        self.grad_norm = 0.0  # the global norm the last clipping saw

    def owns(self, p: int) -> bool:
        """Whether this rank updates pack ``p`` (always, unless the optimizer is sharded)."""
        return self._broadcast is None or self._broadcast.owns(p)

    def join(self, p: int | None = None) -> None:
        """Wait for the overlapped optimizer step in flight (of pack ``p`` only, if given)."""
        if self._worker is not None:
            self._worker.join(p)

    # -- U p ----------------------------------------------------------------------------------
    def update(self, p: int, step: StepState) -> None:
        """Run ``U p``: the checks before the step's first update, then pack p's step."""
        self.join()  # one update at a time, in the schedule's order
        if not step.updated:
            self._first_update(step)
        step.updated.append(p)
        if not self.owns(p):  # sharded optimizer: the owner steps it and broadcasts W
            self._grads.wait_sum(p)
            step.grads.discard(p)
            return
        weights_arrived(self._dp, p)  # the last step's send of these weights, before they change
        if self._ties is not None:  # an owner sums the sharers' gradients; a sharer keeps its own
            self._ties.before_update(p)
        pack = self._packs[p]
        loc = step.placement.update_loc(p)
        self._grads.wait_sum(p)
        if pack.home is Loc.NVME:  # (streamed through host memory: a different algorithm)
            return self._update_from_nvme(p, step)
        if pack.layout.mixed:  # the fp32 masters step on the fp32 gradients
            for master, g in zip(pack.masters, self._grads.views(p, loc)):
                master.grad = g
        elif loc is Loc.DEVICE:
            for e, got in zip(pack.layout.trainable, pack.got_grad):
                if not got:
                    e.tensor.grad = None
        else:
            flat = self._grads.at_home(p, loc)  # (the host optimizer reads these bytes)
            for master, e, got in zip(pack.masters, pack.layout.trainable, pack.got_grad):
                master.grad = e.gview(flat) if got else None
        if loc is not Loc.DEVICE:  # the host writes the masters (and W, in mixed precision)
            for master in pack.masters:
                self._engine.host_write(master.detach(),
                                        f"master weights of pack {p} (its update)")
            if pack.layout.mixed and pack.home_w is not None:
                for e in pack.layout.trainable:
                    self._engine.host_write(e.view(pack.home_w),
                                            f"weights of pack {p} (refreshed by its update)")
        if self._worker is not None and loc is Loc.HOST and self._owners is None:
            # overlap_updates: the step runs behind what follows (harmony.runtime.update_worker)
            self._worker.submit(p, partial(self._host_step, p),
                                partial(self._finish_host_update, step, p))
            return
        self._host_step(p)
        self._finish_host_update(step, p)

    def _first_update(self, step: StepState) -> None:
        """Before the step's first update: every rank's loss, checked; fp16 gradients
        unscaled; the global norm clipped."""
        if self._dp is not None:
            step.loss = self._dp.reduce_loss(step.loss)  # every rank decides on the same loss
        if not torch.isfinite(step.loss):
            # Every micro-batch's loss is known before the first update in the generated
            # schedules, so refusing here leaves every weight as it was.
            raise NonFiniteLoss(step.step, float(step.loss))
        mine = [p for p in range(len(self._packs)) if self.owns(p)]
        # (sharded optimizer: each rank holds its own packs' summed gradients)
        all_sum = self._dp.all_sum if self._dp is not None and self._owners is not None \
            else None
        precision = self._options.precision
        if precision.scaling:
            unscale([g for p in mine for g in self._views(p, step) if g is not None],
                    precision.scale, all_sum, step.step)
        if self._options.clip is not None:
            if self._ties is not None:  # the norm counts a tied gradient once, summed
                self._ties.merge_all()
            max_norm, order = self._options.clip
            norm = clip({p: self._views(p, step) for p in mine}, order, max_norm, all_sum)
            if norm is not None:
                self.grad_norm = norm

    def _views(self, p: int, step: StepState) -> list[torch.Tensor | None]:
        return self._grads.views(p, step.placement.update_loc(p))

    def _host_step(self, p: int) -> None:
        """Pack ``p``'s optimizer step (on the update worker, with overlap_updates): it reads
        the pack's gradients and writes its masters, optimizer state and, in mixed precision,
        its home weights, and nothing else."""
        pack = self._packs[p]
        pack.optimizer.step()
        if pack.layout.mixed:
            assert pack.home_w is not None
            pack.refresh_weights(pack.home_w)

    def _finish_host_update(self, step: StepState, p: int) -> None:
        """What follows pack ``p``'s step, on the runtime's thread."""
        pack = self._packs[p]
        for master in pack.masters:
            master.grad = None
        if self._ties is not None:  # sharers' copies of this pack's tied weights (W refreshed)
            assert pack.home_w is not None
            self._ties.after_update(p, pack.home_w)
        pack.settle_optimizer_bytes()
        self._gradients_done(step, p)

    def stage(self, p: int) -> None:
        """Pack ``p``'s backward begins and its update follows it: for a pack homed on NVMe
        whose optimizer this rank steps, start reading the first chunks of its master weights
        and optimizer state (the reads run while the backward computes)."""
        if self._packs[p].home is not Loc.NVME or not self.owns(p):
            return
        staged = self._updates[p].staged = self._chunked(p)
        staged.stage()

    def _chunked(self, p: int) -> ChunkedUpdate:
        keep = partial(self._keep_for_broadcast, p) if self._owners is not None else None
        return ChunkedUpdate(self._packs[p], self._tiers[Loc.HOST], self._io, self._engine,
                             self._grads, self._weights, self._ties, keep)

    def _keep_for_broadcast(self, p: int, w: torch.Tensor, written: Handle) -> None:
        self._updates[p].sending = (w, written)

    def _update_from_nvme(self, p: int, step: StepState) -> None:
        """Stream pack ``p``'s update through host memory chunk by chunk (see
        :mod:`harmony.runtime.chunked_update`); a deferred update starts its reads now.

        With overlap_updates it runs on the update worker, from a reservation of the host
        bytes it holds (so it never waits for room the runtime's thread would free), unless
        that does not fit now, it is the pack's first update (its state's size is only
        estimated), or tied weights need the chunks' weights on this thread: then in line.
        """
        record = self._updates[p]
        if record.staged is None:  # (staged behind its backward, unless the update is deferred)
            record.staged = self._chunked(p)
        chunked = record.staged
        chunked.prepare()
        if self._worker is not None and self._owners is None and self._ties is None \
                and chunked.reserve():
            self._worker.submit(p, chunked.run, partial(self._finish_nvme_update, step, p))
            return
        chunked.run()  # (after a failure, abandon() gives its buffers back)
        self._finish_nvme_update(step, p)

    def _finish_nvme_update(self, step: StepState, p: int) -> None:
        """What follows pack ``p``'s chunked update, on the runtime's thread."""
        record = self._updates[p]
        staged, record.staged = record.staged, None
        assert staged is not None
        staged.finish()
        self._gradients_done(step, p)

    def _gradients_done(self, step: StepState, p: int) -> None:
        """Pack ``p``'s step has read its gradients: they may go (now, if their deletion was
        deferred while an overlapped step read them)."""
        step.grads.discard(p)
        record = self._updates[p]
        if record.deferred:
            record.deferred = False
            self._grads.delete(p)

    # -- around updates -----------------------------------------------------------------------
    def delete_grads(self, p: int) -> None:
        """``!G p``: delete pack ``p``'s gradients, once its overlapped step (if in flight)
        has read them."""
        if self._worker is not None and self._worker.pending == p:
            self._updates[p].deferred = True  # deleted when joined
            return
        self._grads.delete(p)

    def broadcast(self, p: int) -> None:
        """``*W p``: start sending pack ``p``'s updated weights from its owner to every other
        rank (sharded optimizer)."""
        assert self._broadcast is not None, f"*W{p} needs a sharded optimizer"
        self.join(p)
        self._weights.settle_buffers(p)  # (the collective reads or writes the whole home copy)
        if not self.owns(p):  # it writes this rank's home copy, which a load may still read
            self._weights.settle_home(p)
        record = self._updates[p]
        sending, record.sending = record.sending, None
        self._broadcast.send(self._packs[p], sending)

    def host_full(self) -> bool:
        """The host tier's ``when_full``: join the update in flight, whose bytes (a chunked
        update's reservation, a host-homed step's gradients) then come back; True if there
        was one. Never from the worker itself (it allocates only from its reservation)."""
        if self._worker is None or self._worker.pending is None or self._worker.on_thread():
            return False
        self._worker.join()
        return True

    def end_step(self) -> None:
        """The last overlapped step of the step, joined before anyone reads."""
        self.join()

    def abandon_worker(self) -> None:
        """After a failure, first: wait for the step in flight (it may still read the
        gradients), dropping its error and what would follow it."""
        if self._worker is not None:
            self._worker.abandon()
        for record in self._updates:
            record.deferred = False

    def abandon(self) -> None:
        """After a failure: give back what staged updates and unsent weights hold."""
        host = self._tiers[Loc.HOST]
        for record in self._updates:
            if record.staged is not None:
                record.staged.abandon()
                record.staged = None
        for record in self._updates:
            if record.sending is not None:
                w, written = record.sending
                with contextlib.suppress(Exception):  # (the step's failure is what is raised)
                    host.release(w, after=written)
                record.sending = None

    def close(self) -> None:
        """Stop the update worker, if any."""
        if self._worker is not None:
            self._worker.close()
