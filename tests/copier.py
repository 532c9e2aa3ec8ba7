"""Which copier a run uses: tests of worker processes check that the workers inherited it."""

from __future__ import annotations

import os

import harmony


def expected() -> str:
    """The copier class every engine of this run uses (``--copier``/``HARMONY_COPIER``)."""
    return "DeferredCopier" if os.environ.get("HARMONY_COPIER") == "deferred" else "ThreadCopier"


def used(trainer: harmony.Trainer) -> str:
    """The copier class of ``trainer``'s swap engine."""
    return type(trainer.engine._copier).__name__
