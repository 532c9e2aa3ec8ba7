"""Plans from sizes alone, for tests that compare runs planned apart.

A plan minimises predicted time, so which packs it builds follows the profiled layer times and
the measured link rates, and these move with the machine's load. Tests that compare two runs
pack by pack (or that need a particular plan) replace the measurements with constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import harmony.parallel.data_parallel
import harmony.training.planner

FWD_S, BWD_S, BANDWIDTH = 1e-6, 3e-6, 5e9  # per sample; bytes/s of every measured link


def fix_timing(setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make every layer take FWD_S/BWD_S per sample and every measured link BANDWIDTH.

    ``setattr_`` is ``monkeypatch.setattr`` in a test (undone afterwards); plain ``setattr``
    in a worker process.
    """
    measure = harmony.training.planner.profile_layers

    def constant_times(*args: Any, **kwargs: Any) -> list[Any]:
        return [dataclasses.replace(lp, fwd_s=FWD_S, bwd_s=BWD_S, fwd_group_s=None
                                    if lp.fwd_group_s is None else FWD_S)
                for lp in measure(*args, **kwargs)]

    setattr_(harmony.training.planner, "profile_layers", constant_times)
    setattr_(harmony.training.planner, "measured_bandwidth",
             lambda device: {"host->device": BANDWIDTH, "device->host": BANDWIDTH})
    setattr_(harmony.parallel.data_parallel.hdist, "measure_allreduce", lambda device: BANDWIDTH)
