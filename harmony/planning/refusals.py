"""Requests refused before training, with the numbers: budgets that cannot hold the model,
a disk without room for the plan, a model already too large for the memory it was given.

Each check is a lower bound that no plan can beat, so it refuses only what would fail later
(after minutes of profiling, or hours into training when the disk fills), and each message
gives the bytes needed, the bytes given and what to change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from harmony.model.layout import Layout
from harmony.planning.planner import Plan
from schedules.task import Loc
from swap.tier import fmt_bytes

# Per file the NVMe store writes: its padding to the block size (swap.nvme's alignment).
FILE_SLACK = 4096


def refuse_before_training(model: torch.nn.Module, layouts: Sequence[Layout], k_ratio: float,
                           device: torch.device, device_memory: int | None,
                           host_memory: int | None, nvme_dir: str | os.PathLike[str] | None,
                           built: bool) -> None:
    """The checks a trainer makes at construction: a model ``built`` in host memory beyond
    the budgets (:func:`refuse_model_in_memory`); without ``nvme_dir``, a host budget that
    cannot hold what the device's does not (:func:`refuse_host_without_nvme`); with it, a
    file system without room for what fits in neither (:func:`refuse_nvme_early`).

    Raises:
        ValueError: the first that fails, with its numbers.
    """
    if built:
        refuse_model_in_memory(model, device, device_memory, host_memory)
    if nvme_dir is None:
        refuse_host_without_nvme(layouts, k_ratio, device_memory, host_memory)
    elif Path(nvme_dir).is_dir():  # (the NVMe store says what is wrong with it otherwise)
        refuse_nvme_early(layouts, k_ratio, device_memory, host_memory, nvme_dir)


def state_bytes(layouts: Sequence[Layout], k_ratio: float) -> tuple[int, int]:
    """(weights, optimizer state) of the whole model: the flat W of every layer (each tensor
    once), and ``k_ratio`` times its gradient bytes (masters included in mixed precision)."""
    seen: set[int] = set()
    w = g = 0
    for layout in layouts:
        for e in layout.entries:
            if id(e.tensor) in seen:
                continue
            seen.add(id(e.tensor))
            w += e.nbytes
            if e.trainable:
                g += e.shape.numel() * e.master_dtype.itemsize
    return w, int(k_ratio * g)


def refuse_host_without_nvme(layouts: Sequence[Layout], k_ratio: float,
                             device_memory: int | None, host_memory: int | None) -> None:
    """Without an NVMe tier every weight and optimizer-state byte lives on the device or the
    host, so the host needs at least what the device budget cannot take.

    Raises:
        ValueError: ``host_memory`` below that, with the numbers.
    """
    if host_memory is None or device_memory is None:
        return
    w, k = state_bytes(layouts, k_ratio)
    need = w + k - device_memory
    if need > host_memory:
        raise ValueError(
            f"host_memory={fmt_bytes(host_memory)} is too small without an nvme_dir: the "
            f"model's weights and optimizer state take {fmt_bytes(w + k)} (W {fmt_bytes(w)}, "
            f"K {fmt_bytes(k)}), of which device_memory={fmt_bytes(device_memory)} holds at "
            f"most {fmt_bytes(device_memory)}, so the host must hold at least "
            f"{fmt_bytes(need)} (plus gradients and activations of the pack being updated). "
            f"Give host_memory>={fmt_bytes(need)} or more, or an nvme_dir for the rest")


def model_bytes_in_memory(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers that have storage in host memory."""
    seen: set[int] = set()
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type == "cpu":
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def refuse_model_in_memory(model: torch.nn.Module, device: torch.device,
                           device_memory: int | None, host_memory: int | None) -> None:
    """A model built whole in host memory whose weights alone exceed the host memory the
    budgets allow (``host_memory``, plus ``device_memory`` when the device is the CPU) broke
    them before training began: such a model is built on the meta device instead.

    Raises:
        ValueError: with the numbers and the way to build it on the meta device.
    """
    if host_memory is None:
        return
    allowed = host_memory
    if device.type == "cpu":
        if device_memory is None:
            return
        allowed += device_memory
    held = model_bytes_in_memory(model)
    if held > allowed:
        also = f" + device_memory={fmt_bytes(device_memory or 0)}" \
            if device.type == "cpu" else ""
        raise ValueError(
            f"the model's weights already take {fmt_bytes(held)} of host memory, more than "
            f"host_memory={fmt_bytes(host_memory)}{also} allows: a model this large should "
            "never exist whole in memory. Build it on the meta device (under "
            "torch.device('meta') or harmony.empty_weights()) and pass weights=PATH (a "
            "safetensors file, a Hugging Face directory of shards, or a harmony checkpoint) "
            "or init=fn (default: each module's reset_parameters()): the trainer then "
            "materializes it one pack at a time into its homes. A Hugging Face directory: "
            "harmony.Trainer.from_pretrained(path, loss_fn, ...)")


def free_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged process may still write under ``directory`` (``statvfs``)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def refuse_nvme_early(layouts: Sequence[Layout], k_ratio: float, device_memory: int | None,
                      host_memory: int | None, nvme_dir: str | os.PathLike[str],
                      ) -> None:
    """Before anything is profiled: the training state that fits in neither budget must go
    to ``nvme_dir``, which must have room for it.

    Raises:
        ValueError: the file system has less free space than that, with the numbers.
    """
    if device_memory is None or host_memory is None:
        return
    w, k = state_bytes(layouts, k_ratio)
    need = w + k - device_memory - host_memory
    free = free_bytes(nvme_dir)
    if need > free:
        raise ValueError(_no_room(nvme_dir, free, need, "at least the weights and optimizer "
                                  f"state that neither budget can hold (W {fmt_bytes(w)} + K "
                                  f"{fmt_bytes(k)} - device_memory - host_memory)"))


def refuse_nvme_space(plan: Plan, nvme_dir: str | os.PathLike[str], held: int = 0) -> None:
    """The plan's predicted NVMe peak, and a margin per file, against the free space of
    ``nvme_dir``'s file system (``held``: bytes the store's own files take already, which the
    new plan replaces).

    Raises:
        ValueError: not enough room, with the numbers.
    """
    peak = plan.predicted.peak.get(Loc.NVME, 0)
    if not peak:
        return
    files = sum(3 * len(plan.sizes.chunks_of(p)) + 2 * len(plan.sizes.x[p])
                for p in range(len(plan.bounds)) if plan.placement.w[p] is Loc.NVME
                or plan.placement.x[p] is Loc.NVME)
    need = peak + files * FILE_SLACK
    free = free_bytes(nvme_dir) + held
    if need > free:
        on = [p for p in range(len(plan.bounds)) if plan.placement.w[p] is Loc.NVME]
        raise ValueError(_no_room(nvme_dir, free, need,
                                  f"the plan's NVMe peak ({len(on)} of {len(plan.bounds)} "
                                  "packs' weights and optimizer state there"
                                  + (", and stashed activations" if Loc.NVME in
                                     plan.placement.x else "") + ")"))


def _no_room(nvme_dir: str | os.PathLike[str], free: int, need: int, what: str) -> str:
    return (f"nvme_dir={str(Path(nvme_dir))!r} has {fmt_bytes(free)} free, but training "
            f"needs {fmt_bytes(need)} there: {what}. Free space there (df -h {nvme_dir}), "
            "choose an nvme_dir on a larger file system, or give more host_memory")
