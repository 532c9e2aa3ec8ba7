"""A plan: pack boundaries, placement, prefetch depth, the lowered schedule and its prediction,
and its JSON form.

The planner (:mod:`harmony.planning.planner`) makes plans; the trainer runs them; ``harmony
report --json`` and ``Trainer.record_step`` write them to files, which ``Trainer(plan=...)`` and
``harmony report --run`` read back. :meth:`Plan.to_json` and :meth:`Plan.from_json` carry a plan
through such a file exactly: the plan read back equals the one written.

>>> from schedules.simulate import SimResult, Sizes
>>> from schedules.placement import Placement
>>> from schedules.schedule import Schedule
>>> from schedules.task import Loc
>>> s = Schedule.parse("F0.0 B0.0 U0", name="harmony", packs=1, micro_batches=1,
...                    placement=Placement.uniform(1, Loc.DEVICE), prefetch=1)
>>> p = Plan(((0, 2),), s, Sizes([8], [8], [16], [[4]], [[0]], [[4]], [[8]]),
...          SimResult({Loc.DEVICE: 40}, {}, {}, 1e-3, []))
>>> Plan.from_json(p.to_json()) == p
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schedules.placement import Placement
from schedules.schedule import Schedule
from schedules.simulate import SimResult, Sizes
from schedules.task import Loc
from swap.tier import fmt_bytes

__all__ = ["InfeasiblePlan", "Plan", "sim_from_json", "sim_to_json"]


class InfeasiblePlan(ValueError):
    """No plan fits the budgets. ``device_needed`` / ``host_needed``: what the most frugal plan
    needs on each tier (bytes), so a caller can retry with a budget that works."""

    def __init__(self, message: str, device_needed: int, host_needed: int) -> None:
        super().__init__(message)
        self.device_needed, self.host_needed = device_needed, host_needed


@dataclass(frozen=True)
class Plan:
    """Pack boundaries, placement, prefetch depth, the lowered schedule and its prediction."""

    bounds: tuple[tuple[int, int], ...]   # [start, stop) layer indices per pack
    schedule: Schedule                    # lowered
    sizes: Sizes
    predicted: SimResult
    # Sharded optimizer: the rank owning each pack's optimizer state (None: every rank)
    owners: tuple[int, ...] | None = None
    # Micro-batches per forward task in the packs that may group (1: a forward per
    # micro-batch), and the packs that may not: (pack, its first layer that cannot, why).
    forward_group: int = 1
    ungrouped: tuple[tuple[int, int, str], ...] = ()
    # NVMe-homed packs stream their updates in chunks of at most this many bytes of W and K
    # (harmony.planning.chunks, harmony.runtime.chunked_update); None: each update holds its
    # whole pack
    update_chunk: int | None = None
    # Host- and NVMe-homed packs' updates run on the update worker (harmony.runtime.update_worker),
    # as planned with Trainer(overlap_updates=True) where that fits the host budget
    overlap_updates: bool = False

    @property
    def placement(self) -> Placement:
        assert self.schedule.placement is not None
        return self.schedule.placement

    def describe(self, names: list[str]) -> str:
        lines = [f"schedule {self.schedule.name}, {len(self.bounds)} packs, "
                 f"{self.schedule.micro_batches} micro-batches, prefetch {self.schedule.prefetch}"]
        for p, (a, b) in enumerate(self.bounds):
            lines.append(f"  pack {p}: layers {a}..{b - 1} ({names[a]}..{names[b - 1]}), "
                         f"W {fmt_bytes(self.sizes.w[p])} at {self.placement.w[p].value}, "
                         f"X at {self.placement.x[p].value}")
        if self.update_chunk is not None:
            counts = ", ".join(f"pack {p} in {len(self.sizes.chunks_of(p))}"
                               for p in range(len(self.bounds))
                               if self.placement.k[p] is Loc.NVME)
            lines.append(f"  NVMe updates stream in chunks of at most "
                         f"{fmt_bytes(self.update_chunk)}: {counts}")
        if self.overlap_updates:
            lines.append("  updates of packs whose optimizer state is off the device run on "
                         "the update worker, behind the next pack's backward")
        if self.forward_group > 1:
            lines += self._describe_groups(names)
        peaks = ", ".join(f"{k.value} {fmt_bytes(v)}" for k, v in self.predicted.peak.items())
        lines.append(f"  predicted peak: {peaks}")
        return "\n".join(lines)

    def _describe_groups(self, names: list[str]) -> list[str]:
        g = self.forward_group
        grouped = sorted({t.pack for t in self.schedule.tasks if len(t.mbs) > 1})
        lines = [f"  forward groups of {g} micro-batches: "
                 + (f"packs {', '.join(map(str, grouped))}" if grouped else "no pack")]
        if len(self.bounds) == 1:
            lines[-1] += " (the only pack runs its forward inside its backward)"
        lines += [f"    pack {p} one micro-batch at a time: layer {i} ({names[i]!r}) {why}"
                  for p, i, why in self.ungrouped]
        return lines

    # -- its JSON form ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """This plan as JSON-ready data; :meth:`from_json` gives back an equal plan.

        Holds the pack bounds, the lowered schedule (name, counts, placement, prefetch depth
        and its tasks' text form), the sizes it was planned with and the prediction (peaks,
        bytes per link, step time, bytes per tier after every task).

        Example::

            Path("plan.json").write_text(json.dumps({"plan": trainer.plan.to_json()}))
        """
        s = self.schedule
        assert s.placement is not None
        return {"bounds": [list(b) for b in self.bounds],
                "forward_group": self.forward_group,
                "ungrouped": [list(u) for u in self.ungrouped],
                "schedule": {"name": s.name, "packs": s.packs, "micro_batches": s.micro_batches,
                             "recompute": s.recompute, "prefetch": s.prefetch,
                             "placement": s.placement.to_json(), "tasks": str(s)},
                "sizes": {f: [list(v) if isinstance(v, (list, tuple)) else v
                              for v in getattr(self.sizes, f)]
                          for f in ("w", "g", "k", "x", "d", "s", "work", "held")}
                | {"chunks": [[list(c) for c in cs] for cs in self.sizes.chunks]},
                "update_chunk": self.update_chunk, "overlap_updates": self.overlap_updates,
                "predicted": sim_to_json(self.predicted)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        """The plan :meth:`to_json` wrote (fields a file of an older version lacks take their
        defaults).

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a plan.
        """
        s = data["schedule"]
        schedule = Schedule.parse(s["tasks"], name=s["name"], packs=s["packs"],
                                  micro_batches=s["micro_batches"], recompute=s["recompute"],
                                  placement=Placement.from_json(s["placement"]),
                                  prefetch=s["prefetch"])
        z = data["sizes"]
        sizes = Sizes(*(z[f] for f in ("w", "g", "k", "x", "d", "s", "work")),
                      held=tuple(tuple(h) for h in z.get("held", ())),  # type: ignore[misc]
                      chunks=tuple(tuple(tuple(c) for c in cs) for cs in z.get("chunks", ())))
        return cls(tuple((a, b) for a, b in data["bounds"]), schedule, sizes,
                   sim_from_json(data["predicted"]),
                   forward_group=int(data.get("forward_group", 1)),
                   ungrouped=tuple((int(p), int(i), str(why)) for p, i, why in
                                   data.get("ungrouped", ())),
                   update_chunk=data.get("update_chunk"),
                   overlap_updates=bool(data.get("overlap_updates", False)))


def sim_to_json(res: SimResult) -> dict[str, Any]:
    """A prediction as JSON-ready data (:func:`sim_from_json` reads it back)."""
    return {"peak": {k.value: v for k, v in res.peak.items()},
            "bytes_moved": dict(res.bytes_moved),
            "bytes_by_kind": [[lk, kind, n] for (lk, kind), n in res.bytes_by_kind.items()],
            "step_time": res.step_time,
            "timeline": [{k.value: v for k, v in point.items()} for point in res.timeline]}


def sim_from_json(data: dict[str, Any]) -> SimResult:
    """Inverse of :func:`sim_to_json`."""
    return SimResult({Loc(k): int(v) for k, v in data["peak"].items()},
                     {k: int(v) for k, v in data["bytes_moved"].items()},
                     {(lk, kind): int(n) for lk, kind, n in data["bytes_by_kind"]},
                     data["step_time"],
                     [{Loc(k): int(v) for k, v in point.items()} for point in data["timeline"]])
