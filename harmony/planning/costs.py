"""What a candidate plan holds and takes: the bytes of every value of a step and the seconds of
every task, for given pack boundaries and micro-batch sizes, from the layers' profiles.

The planner (:mod:`harmony.planning.planner`) prices each candidate with these before it
lowers and simulates it; ``harmony report`` and pipeline stages use them for their own
schedules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from harmony.planning.chunks import item_bytes, profile_chunks
from harmony.planning.groups import pack_forward_seconds
from harmony.planning.profile import LayerProfile, scaled
from harmony.planning.request import Tied
from schedules.placement import Placement
from schedules.simulate import Sizes, Times
from schedules.task import Loc

__all__ = ["NVME_BANDWIDTH", "chunk_options", "chunked", "pack_sizes", "pack_times"]

# Assumed NVMe bandwidths (bytes/s) until measured: a PCIe 3 NVMe drive.
NVME_BANDWIDTH = {"nvme->device": 2.0e9, "device->nvme": 1.5e9, "nvme->host": 2.0e9,
                  "host->nvme": 1.5e9}


def pack_sizes(profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
               micro_batches: list[int], k_ratio: float,
               tied: Sequence[Tied] = ()) -> Sizes:
    """Bytes of every value of a step for these pack boundaries and micro-batch sizes.

    ``tied``: weights used by several layers. Each pack using one holds it (a copy in the
    packs after the first); only the first pack's optimizer holds state for it, and each
    later pack's gradient of it may be held until the first pack's update (``Sizes.held``).
    """
    pack_of = [p for p, (a, b) in enumerate(bounds) for _ in range(a, b)]
    untrained = [0] * len(bounds)  # gradient bytes of tied copies, per pack
    held = []
    for layers_using, nbytes in tied:
        packs = sorted({pack_of[i] for i in layers_using})
        for sharer in packs[1:]:
            untrained[sharer] += nbytes
            held.append((sharer, packs[0], nbytes))
    w, g, k, x, d, s, work = [], [], [], [], [], [], []
    for p, (a, b) in enumerate(bounds):
        layers = profiles[a:b]
        w.append(sum(lp.w_bytes for lp in layers))
        g.append(sum(lp.g_bytes for lp in layers))
        k.append(int(math.ceil(k_ratio * max(g[-1] - untrained[p], 0))))
        saved = sum(lp.saved_bytes for lp in layers)
        # Beside every layer's saved tensors, one layer's transient bytes at a time: twice the
        # largest output, or more where a layer was measured to need more (CUDA profiles).
        transient = max(max(2 * lp.out_bytes for lp in layers),
                        max(lp.work_bytes - lp.saved_bytes for lp in layers))
        x.append([scaled(layers[0].in_bytes, n) for n in micro_batches])
        d.append([scaled(layers[0].in_grad_bytes, n) if p else 0 for n in micro_batches])
        s.append([scaled(saved, n) for n in micro_batches])
        work.append([scaled(saved + transient, n) for n in micro_batches])
    return Sizes(w, g, k, x, d, s, work, tuple(held))


def chunked(sizes: Sizes, profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
            k_ratio: float, update_chunk: int | None) -> Sizes:
    """``sizes`` with each pack's NVMe update split into chunks of at most ``update_chunk``
    bytes of W and K (:func:`harmony.planning.chunks.profile_chunks`, the split the runtime makes
    from the pack's layout); None, or a pack that is one chunk: the whole pack, ``(w[p], k[p])``,
    less its frozen parameters, which an update neither reads nor writes."""
    frozen = [sum(lp.frozen_bytes for lp in profiles[a:b]) for a, b in bounds]
    if update_chunk is None and not any(frozen):
        return dataclasses.replace(sizes, chunks=())
    out = []
    for p, (a, b) in enumerate(bounds):
        parts = profile_chunks([(lp.params, lp.w_bytes, lp.g_bytes, lp.frozen_bytes)
                                for lp in profiles[a:b]], update_chunk, k_ratio) \
            if update_chunk is not None else []
        out.append(tuple(parts) if len(parts) > 1
                   else ((sizes.w[p] - frozen[p], sizes.k[p]),))
    return dataclasses.replace(sizes, chunks=tuple(out))


def chunk_options(update_chunk: int | str | None, profiles: list[LayerProfile],
                  bounds: tuple[tuple[int, int], ...], placement: Placement, sizes: Sizes,
                  k_ratio: float) -> list[int | None]:
    """The chunk budgets to try for a candidate, most generous first: ``[None]`` without an
    NVMe-homed pack; the given budget; for ``"smaller"``, a quarter, an eighth, ... of the
    largest NVMe pack's W + K (fewer than four chunks hold as much as the whole pack: three
    are in host memory at once), down to its largest parameter."""
    nvme = [p for p in range(placement.packs) if placement.k[p] is Loc.NVME]
    if not nvme or update_chunk is None:
        return [None]
    if isinstance(update_chunk, int):
        return [update_chunk]
    largest = max(sizes.w[p] + sizes.k[p] for p in nvme)
    biggest = max(max(item_bytes([w for w, _ in lp.params] or [lp.w_bytes],
                                 [g for _, g in lp.params] or [lp.g_bytes], 0, k_ratio))
                  for p in nvme for lp in profiles[bounds[p][0]:bounds[p][1]])
    options: list[int | None] = []
    chunk = largest // 4
    while chunk > 0:
        options.append(chunk)
        if chunk <= biggest:  # every parameter is a chunk already
            break
        chunk //= 2
    return options or [None]


def pack_times(profiles: list[LayerProfile], bounds: tuple[tuple[int, int], ...],
               micro_batches: list[int], upd_s_per_byte: float,
               bandwidth: dict[str, float], forward_group: int = 1) -> Times:
    """Seconds of every compute task, and the links' bandwidths; with ``forward_group`` > 1
    also of every pack's forward over each group of that many micro-batches
    (:func:`harmony.planning.groups.pack_forward_seconds`)."""
    fwd = [[pack_forward_seconds(profiles[a:b], n) for n in micro_batches] for a, b in bounds]
    bwd = [[sum(lp.bwd_s for lp in profiles[a:b]) * n for n in micro_batches] for a, b in bounds]
    upd = [sum(lp.g_bytes for lp in profiles[a:b]) * upd_s_per_byte for a, b in bounds]
    links = {**NVME_BANDWIDTH, **bandwidth}
    groups = {}
    M = len(micro_batches)
    for p, (a, b) in enumerate(bounds):
        for first in range(0, M if forward_group > 1 else 0, forward_group):
            last = min(first + forward_group, M) - 1
            if last > first:
                groups[(p, first, last)] = pack_forward_seconds(
                    profiles[a:b], sum(micro_batches[first:last + 1]))
    return Times(fwd, bwd, upd, links, groups)
