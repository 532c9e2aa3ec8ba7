"""Forward groups: which packs may run one forward over several micro-batches, and how long
such a forward takes.

A forward group (``F1.0-3`` in a schedule) concatenates its micro-batches' inputs, runs each
layer of the pack once over all their samples, and splits the output into one stashed input
per micro-batch of the next pack; backward still recomputes per micro-batch. It gives what
per-micro-batch forwards give (up to the rounding of larger matrix products) only when every
layer of the pack draws no random numbers, changes no buffers and treats samples
independently; the profile records why a layer cannot (:attr:`LayerProfile.no_group`).

Time: a forward over more samples uses a device better, so its time per sample falls. The
profile times each layer's forward at the micro-batch size ``n1`` and over two micro-batches
``n2``; :func:`forward_seconds` takes the line through both points for ``n >= n1`` (a cost
per call plus a cost per sample) and the profiled rate below, so a forward of at most one
micro-batch takes what it always took.

>>> from harmony.planning.profile import LayerProfile
>>> lp = LayerProfile("l", 0, 0, 0.0, 0.0, 0.0, 0.0, fwd_s=2e-3, bwd_s=0.0, samples=2,
...                   fwd_group_s=1.5e-3, group_samples=4)
>>> [round(forward_seconds(lp, n) * 1e3, 3) for n in (1, 2, 4, 8)]   # ms: 2 + 1 per sample
[2.0, 4.0, 6.0, 10.0]
"""

from __future__ import annotations

from collections.abc import Sequence

from harmony.planning.profile import LayerProfile

Bounds = tuple[tuple[int, int], ...]


def forward_seconds(lp: LayerProfile, samples: int) -> float:
    """Seconds of ``lp``'s forward over ``samples`` samples (see the module docstring).

    The cost per sample is taken as at least a quarter of the two-micro-batch forward's time
    per sample (at most three quarters of that forward is a cost per call): timing noise must
    not predict that a forward gets free as it grows.
    """
    if lp.fwd_group_s is None or lp.samples <= 0 or lp.group_samples <= lp.samples \
            or samples <= lp.samples:
        return lp.fwd_s * samples
    n1, t1 = lp.samples, lp.fwd_s * lp.samples
    n2, t2 = lp.group_samples, lp.fwd_group_s * lp.group_samples
    per_sample = max((t2 - t1) / (n2 - n1), 0.25 * lp.fwd_group_s)
    return t1 + per_sample * (samples - n1)


def pack_forward_seconds(layers: Sequence[LayerProfile], samples: int) -> float:
    """Seconds of a pack's forward over ``samples`` samples."""
    if all(lp.fwd_group_s is None for lp in layers):
        return sum(lp.fwd_s for lp in layers) * samples  # (as without group timings)
    return sum(forward_seconds(lp, samples) for lp in layers)


def ungrouped(profiles: Sequence[LayerProfile], bounds: Bounds) -> tuple[tuple[int, int, str], ...]:
    """The packs that run a separate forward (all but the last) but cannot group: for each,
    ``(pack, layer, why)`` naming its first layer that cannot and why."""
    out = []
    for p, (a, b) in enumerate(bounds[:-1]):
        bad = next((i for i in range(a, b) if profiles[i].no_group), None)
        if bad is not None:
            out.append((p, bad, profiles[bad].no_group))
    return tuple(out)


def grouped_packs(profiles: Sequence[LayerProfile], bounds: Bounds) -> frozenset[int]:
    """The packs whose forwards may run over groups of micro-batches."""
    bad = {p for p, _, _ in ungrouped(profiles, bounds)}
    return frozenset(p for p in range(len(bounds) - 1) if p not in bad)


def group_sizes(micro_batches: int) -> list[int]:
    """The forward group sizes worth trying for ``micro_batches``: 2, 4, 8, ... below it, and
    all of them.

    >>> group_sizes(6), group_sizes(8), group_sizes(1)
    ([2, 4, 6], [2, 4, 8], [])
    """
    sizes = [1 << i for i in range(1, micro_batches.bit_length()) if 1 << i < micro_batches]
    return sizes + [micro_batches] if micro_batches > 1 else []


def forward_group_of(forward_micro_batch_size: object, micro_batch_size: object,
                     schedule: str, parallel: str | None) -> int | None:
    """Micro-batches per forward for ``Trainer(forward_micro_batch_size=...)``: 1 for None
    (a forward per micro-batch), None for ``"auto"`` (the planner chooses).

    Raises:
        ValueError: not a positive int or "auto", not a multiple of ``micro_batch_size``
            (or that is "auto" while this is an int), or forward groups with a schedule or
            parallelism that has none; the message says what to pass instead.
    """
    f = forward_micro_batch_size
    if f is None:
        return 1
    if f != "auto" and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
        raise ValueError(f"forward_micro_batch_size={f!r} must be a positive int (a multiple "
                         "of micro_batch_size), 'auto' or None")
    if isinstance(f, int) and not isinstance(micro_batch_size, int):
        raise ValueError(f"forward_micro_batch_size={f!r} must be a multiple of "
                         f"micro_batch_size, which is {micro_batch_size!r}; give "
                         "micro_batch_size as an int, or forward_micro_batch_size='auto'")
    if isinstance(f, int) and isinstance(micro_batch_size, int) and f % micro_batch_size:
        lower = max(f // micro_batch_size, 1) * micro_batch_size
        raise ValueError(f"forward_micro_batch_size={f} is not a multiple of micro_batch_size="
                         f"{micro_batch_size}; use {lower} or {lower + micro_batch_size}")
    group = None if f == "auto" else int(f) // int(micro_batch_size)  # type: ignore[call-overload]
    if group == 1:
        return 1
    if schedule != "harmony":
        raise ValueError(f"forward_micro_batch_size={f!r} with schedule={schedule!r}: only "
                         "schedule='harmony' runs a forward over several micro-batches (its "
                         "backward recomputes each one from its stashed input); drop "
                         "forward_micro_batch_size or use schedule='harmony'")
    if parallel == "pipeline":
        raise ValueError(f"forward_micro_batch_size={f!r} with parallel='pipeline' is not "
                         "supported (pipeline stages pass one micro-batch at a time); drop "
                         "forward_micro_batch_size")
    return group


def refuse_ungroupable(forward_micro_batch_size: int, packs: int,
                       why: Sequence[tuple[int, int, str]], names: Sequence[str]) -> None:
    """Raise ValueError when forward groups were asked for but no pack with a forward of its
    own (all but the last) can run one; ``why`` as :func:`ungrouped` gives it."""
    if packs < 2 or len(why) < packs - 1:
        return  # some pack groups (or the only pack runs its forward inside its backward)
    reasons = "; ".join(f"layer {i} ({names[i]!r}) {text}" for _, i, text in why[:3])
    raise ValueError(f"forward_micro_batch_size={forward_micro_batch_size} asks for forwards "
                     f"over several micro-batches, but no pack can run one: {reasons}. "
                     "Grouping needs layers that draw no random numbers, change no buffers "
                     "and treat samples independently; drop forward_micro_batch_size (or use "
                     "'auto'), or take those out of the model (dropout p=0, BatchNorm in eval "
                     "mode)")
