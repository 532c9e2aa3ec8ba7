"""A schedule: the ordered tasks of one optimizer step on one rank, as plain data."""

from __future__ import annotations

from dataclasses import dataclass

from schedules.placement import Placement
from schedules.task import Loc, Op, Task


@dataclass(frozen=True)
class Schedule:
    """The tasks of one step, in the order a rank runs them.

    Args:
        name: the generator that made it (``"harmony"``, ``"per-microbatch"``, ``"resident"``).
        packs: number of packs; the last one's forward is fused into its backward.
        micro_batches: number of micro-batches in the step.
        tasks: the tasks in order.
        recompute: True when each backward recomputes its forward from the stashed input; False
            when forwards keep their autograd graph (S values) until their backward.
        placement: where values live; None for a compute-only schedule (before lowering).
        prefetch: the prefetch depth the lowering used (packs ahead), None before lowering.
        stage: for one rank of a pipeline, the packs ``[first, stop)`` it runs (pack numbers
            stay global: rank 1 of ``stage=(2, 4)`` runs F2.0, not F0.0); None: every pack.
        rank: the pipeline rank this schedule is for (SEND/RECV peers are ``rank +- 1``).

    ``str(schedule)`` is the tasks' text form separated by spaces; :meth:`parse` reverses it.
    """

    name: str
    packs: int
    micro_batches: int
    tasks: tuple[Task, ...]
    recompute: bool = True
    placement: Placement | None = None
    prefetch: int | None = None
    stage: tuple[int, int] | None = None
    rank: int = 0

    def __str__(self) -> str:
        return " ".join(str(t) for t in self.tasks)

    @property
    def local_packs(self) -> range:
        """The packs this rank runs (all of them outside a pipeline)."""
        first, stop = self.stage if self.stage is not None else (0, self.packs)
        return range(first, stop)

    @property
    def forward_group(self) -> int:
        """The most micro-batches one forward task covers (1: a forward per micro-batch)."""
        return max((len(t.mbs) for t in self.tasks if t.op is Op.FWD), default=1)

    @property
    def lowered(self) -> bool:
        return self.placement is not None

    def compute_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.op.is_compute]

    def with_tasks(self, tasks: list[Task], placement: Placement | None, prefetch: int | None,
                   ) -> Schedule:
        return Schedule(self.name, self.packs, self.micro_batches, tuple(tasks), self.recompute,
                        placement, prefetch, self.stage, self.rank)

    @staticmethod
    def parse(text: str, *, name: str = "custom", packs: int | None = None,
              micro_batches: int | None = None, recompute: bool = True,
              placement: Placement | None = None, prefetch: int | None = None,
              stage: tuple[int, int] | None = None, rank: int = 0) -> Schedule:
        """Build a schedule from its text form (counts default to the largest seen, plus one)."""
        tasks = tuple(Task.parse(word) for word in text.split())
        seen_p = 1 + max((t.pack for t in tasks), default=-1)
        seen_m = 1 + max((t.mbs[-1] for t in tasks if t.mb is not None), default=-1)
        return Schedule(name, packs if packs is not None else seen_p,
                        micro_batches if micro_batches is not None else seen_m,
                        tasks, recompute, placement, prefetch, stage, rank)

    def grid(self, mark: int | None = None, width: int = 24) -> str:
        """The tasks as a pack-by-time grid; ``mark`` (a task index) is shown as ``>task<``.

        Rows are packs, columns are task positions; compute tasks show their text, data moves
        show theirs in the same row. Long schedules wrap every ``width`` columns.
        """
        cells = [(">" + str(t) + "<") if i == mark else str(t) for i, t in enumerate(self.tasks)]
        col_w = max([len(c) for c in cells] + [3])
        rows = max([self.packs] + [t.pack + 1 for t in self.tasks])
        lines: list[str] = []
        for start in range(0, len(cells), width):
            stop = min(start + width, len(cells))
            lines.append("      " + " ".join(f"{i:>{col_w}}" for i in range(start, stop)))
            for p in range(rows):
                row = [cells[i] if self.tasks[i].pack == p else "." for i in range(start, stop)]
                lines.append(f"P{p:<4} " + " ".join(f"{c:>{col_w}}" for c in row))
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def weight_loads(self) -> dict[int, int]:
        """How many times each pack's weights are swapped in per step."""
        counts = {p: 0 for p in range(self.packs)}
        for t in self.tasks:
            if t.op is Op.SWAP_IN and t.kind is not None and t.kind.value == "W":
                counts[t.pack] += 1
        return counts

    def uses_tier(self, loc: Loc) -> bool:
        p = self.placement
        return p is not None and any(loc in v for v in (p.w, p.k, p.x))
