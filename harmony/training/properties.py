"""Read-only properties that give a field of one of the trainer's owners.

Example::

    class Trainer:
        device = held("device", "The compute device.")   # self._holdings.device
"""

from __future__ import annotations

from typing import Any

__all__ = ["budget", "held", "planned", "setting"]


def setting(name: str, doc: str) -> Any:
    """A read-only property giving the trainer's setting ``name`` (from its config)."""
    return property(lambda self: getattr(self._config, name), doc=doc)


def held(name: str, doc: str) -> Any:
    """A read-only property giving ``name`` of the trainer's holdings."""
    return property(lambda self: getattr(self._holdings, name), doc=doc)


def planned(name: str, doc: str) -> Any:
    """A read-only property giving ``name`` of the trainer's planner."""
    return property(lambda self: getattr(self._planner, name), doc=doc)


def budget(name: str, doc: str) -> Any:
    """A property giving the planner's budget ``name``; setting it has the planner check and
    take the new value (:meth:`~harmony.training.planner.TrainerPlanner.set_budget`)."""
    def get(self: Any) -> Any:
        return getattr(self._planner, name)

    def set_(self: Any, value: Any) -> None:
        self._planner.set_budget(name, value, planned=self._steps.built is not None)

    return property(get, set_, doc=doc)
