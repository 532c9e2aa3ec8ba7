"""What a plan is asked for: one frozen value holding everything the planner needs.

A :class:`PlanRequest` gathers the layers' profiles, the schedule, the micro-batch sizes, the
budgets, the link rates and the constraints a trainer (or ``harmony report``, or a pipeline
stage) puts on the plan. :func:`harmony.planning.planner.plan` takes one; the search and its
helpers read its fields by name, and a variant of a request (another update-chunk choice,
say) is ``dataclasses.replace(request, ...)``.

>>> from harmony.planning.profile import LayerProfile
>>> layer = LayerProfile("l", 4096, 4096, 1024.0, 1024.0, 2048.0, 512.0, 1e-4, 2e-4)
>>> r = PlanRequest([layer] * 4, "harmony", [2, 2], 1 << 20, None, 2.0,
...                 {"host->device": 1e9, "device->host": 1e9})
>>> r.forward_group, r.nvme, r.fixed
(1, False, None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass

from harmony.planning.profile import LayerProfile
from schedules.placement import Placement

__all__ = ["Bounds", "PlanRequest", "Tied"]

Bounds = tuple[tuple[int, int], ...]  # [start, stop) layers per pack
Tied = tuple[tuple[int, ...], int]  # (layers using one weight, bytes of its gradient)


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan is asked for (see :func:`harmony.planning.planner.plan`).

    The first seven fields may be given by position, the others by name.

    Attributes:
        profiles: one per layer, from :func:`harmony.planning.profile.profile_layers`.
        schedule: generator name (``harmony``, ``per-microbatch``, ``resident``).
        micro_batches: samples per micro-batch.
        device_budget, host_budget: bytes, None for no limit.
        k_ratio: optimizer-state bytes per parameter byte (with mixed precision's fp32
            masters).
        bandwidth: bytes/s per link for the time prediction.
        upd_s_per_byte: update seconds per gradient byte.
        prefetch: force a prefetch depth (None: try 1 then 0).
        fixed: keep these pack bounds and placement (re-planning a later step's shapes).
        nvme: whether an NVMe tier exists (then W, K and X may live there).
        deferred_updates: updates after the last backward (global-norm gradient clipping,
            fp16's overflow check).
        tied: weights used by several layers: (the layers using one, its gradient bytes).
        ranks, local_ranks: data-parallel ranks in all and on this machine (see
            :mod:`schedules.data_parallel`): with ranks > 1 the schedules all-reduce each
            pack's gradients (at ``bandwidth["allreduce"]``, default
            :data:`harmony.planning.planner.ALLREDUCE_BANDWIDTH`), and this machine's ranks
            share its host and NVMe links.
        shard: this rank, when the optimizer state is sharded over the ranks (ranks > 1):
            each pack's owner (:func:`schedules.data_parallel.owners`, by K bytes) alone holds
            its K, so K is charged only for this rank's packs; the schedules reduce G to the
            owner and broadcast W from it (:func:`schedules.data_parallel.add_reduce_broadcast`).
        update_chunk: how NVMe-homed packs stream their updates through host memory: None,
            each update holds its whole pack's W and K; bytes, in chunks of at most that
            (:mod:`harmony.planning.chunks`); ``"auto"``, the plan of whole packs if one
            fits, else, per candidate, the largest of
            :func:`harmony.planning.costs.chunk_options` that fits (chunked updates read only
            two chunks behind the backward, so they are slower where both fit); ``"smaller"``
            (the search's own choice, used by ``"auto"``): chunks only. ``Plan.update_chunk``
            says which.
        overlap_updates: the updates of packs whose K is on the host or NVMe run behind what
            follows them (:mod:`harmony.runtime.update_worker`; see
            :func:`schedules.simulate.simulate`), unless only a plan updating in line fits
            (``Plan.overlap_updates`` says which).
        forward_group: micro-batches per forward task in the packs whose layers may group
            (``harmony`` only; :mod:`harmony.planning.groups`); None: choose (see
            :mod:`harmony.planning.planner`).
        staging: NVMe <-> device moves pass through host staging buffers (a CUDA device; see
            :func:`schedules.simulate.simulate`), charged against the host budget.

    Raises:
        ValueError: a forward group that is not a positive int or None.
    """

    profiles: list[LayerProfile]
    schedule: str
    micro_batches: list[int]
    device_budget: int | None
    host_budget: int | None
    k_ratio: float
    bandwidth: dict[str, float]
    _: KW_ONLY
    upd_s_per_byte: float = 1e-9
    prefetch: int | None = None
    fixed: tuple[Bounds, Placement] | None = None
    nvme: bool = False
    deferred_updates: bool = False
    tied: Sequence[Tied] = ()
    ranks: int = 1
    local_ranks: int = 1
    shard: int | None = None
    update_chunk: int | str | None = None
    overlap_updates: bool = False
    forward_group: int | None = 1
    staging: bool = False

    def __post_init__(self) -> None:
        g = self.forward_group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"forward_group={g!r} must be a positive int or None")
