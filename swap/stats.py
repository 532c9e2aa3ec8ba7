"""Counters of bytes and time per link, peak bytes per tier and seconds per phase."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Cumulative counters since construction or :meth:`reset`.

    Attributes:
        bytes_moved: bytes per link, e.g. ``{"host->device": ...}``.
        bytes_by_kind: bytes per (link, kind), kind one of ``"W" "G" "K" "X" "D"``, and
            ``"T"``: targets copied from pinned host memory on CUDA.
        busy_seconds: seconds each link spent copying (summed over its copies).
        stall_seconds: seconds compute waited for each link's copies.
        peak_bytes: highest accounted bytes per tier (``"device"``, ``"host"``, ``"nvme"``);
            on CUDA also ``"device reserved"``, what PyTorch's caching allocator reserved at
            most since the trainer's first plan (see :mod:`harmony.planning.device_memory`), and
            ``"host pinned"``, the most host bytes page-locked at once.
        seconds: wall seconds per phase (``"forward"``, ``"backward"``, ``"update"``, ``"step"``).
        skipped_steps: steps skipped for a non-finite loss (``Trainer(nonfinite="skip")``).
    """

    bytes_moved: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_by_kind: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    busy_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stall_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    peak_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    skipped_steps: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # What :meth:`reset` also calls: each tier's peak restarting from its current use, so
    # that peak_bytes after a reset is the peak since then (see :meth:`on_reset`).
    _on_reset: list[Callable[[], None]] = field(default_factory=list, repr=False,
                                                compare=False)

    def on_reset(self, restart_peak: Callable[[], None]) -> None:
        """Have :meth:`reset` call ``restart_peak`` (a tier's ``reset_peak``), so that the
        peaks counted after a reset start from the tiers' use at the reset, not from their
        highest use ever.

        >>> from swap.tier import Tier
        >>> import torch
        >>> s, t = Stats(), Tier("host", torch.device("cpu"), None)
        >>> s.on_reset(t.reset_peak)
        >>> t.charge(100); t.uncharge(100); s.reset(); t.peak
        0
        """
        self._on_reset.append(restart_peak)

    def count(self, link: str, kind: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_moved[link] += nbytes
            self.bytes_by_kind[(link, kind)] += nbytes

    def busy(self, link: str, seconds: float) -> None:
        with self._lock:
            self.busy_seconds[link] += seconds

    def stall(self, link: str, seconds: float) -> None:
        with self._lock:
            self.stall_seconds[link] += seconds

    def reset(self) -> None:
        """Zero every counter (peaks restart from the tiers' current use on the next update)."""
        with self._lock:
            for d in (self.bytes_moved, self.bytes_by_kind, self.busy_seconds,
                      self.stall_seconds, self.seconds):
                d.clear()
            self.peak_bytes.clear()
            self.skipped_steps = 0
        for restart_peak in self._on_reset:
            restart_peak()

    def kind_bytes(self, link: str, kind: str) -> int:
        """Bytes of one kind over one link, e.g. ``kind_bytes("host->device", "W")``."""
        return self.bytes_by_kind.get((link, kind), 0)

    def summary(self) -> str:
        """One line per link and tier, for logs."""
        gib = 1 << 30
        parts = [f"{k}: {v / gib:.3f} GiB" for k, v in sorted(self.bytes_moved.items())]
        parts += [f"peak {k}: {v / gib:.3f} GiB" for k, v in sorted(self.peak_bytes.items())]
        return ", ".join(parts)
