"""The public entry point: :class:`Trainer`.

A trainer is composed of owners, each holding one part of its state: its settings
(:class:`~harmony.training.config.TrainerConfig`, frozen and checked when made), its
surroundings made at construction (:class:`~harmony.training.holdings.Holdings`: device, tiers,
NVMe store, swap engine, process groups), its planner
(:class:`~harmony.training.planner.TrainerPlanner`), what lives under the current plan
(:class:`~harmony.training.built.Built`: packs, runtime, ties; a re-home replaces it whole) and
its state I/O (:class:`~harmony.training.state_io.StateIO`); its steps
(:class:`~harmony.training.steps.Steps`) run on what is built and move between plans. The
trainer's public methods delegate to the owners.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmony.planning.plan import InfeasiblePlan, Plan
from harmony.runtime.runtime import NonFiniteLoss, Runtime
from harmony.training.built import ShapeKey
from harmony.training.config import TrainerConfig
from harmony.training.handback import Handback, refuse_if_closed, why_not_given_back
from harmony.training.optimizer_state import OptimizerTensors
from harmony.training.ownership import acts
from harmony.training.planner import TrainerPlanner
from harmony.training.properties import budget as _budget
from harmony.training.properties import held as _held
from harmony.training.properties import planned as _planned
from harmony.training.properties import setting as _setting
from harmony.training.recording import Recorder
from harmony.training.setup import set_up
from harmony.training.state_io import StateIO
from harmony.training.steps import Steps

__all__ = ["Trainer"]

class Trainer:
    """Trains a chain of layers whose training state need not fit in device memory.

    Args:
        model: an ``nn.Sequential``, a list of modules, or a module with ``harmony_chain()``.
            The trainer holds it until :meth:`close`: its parameters live in the trainer's
            buffers (read them with :meth:`state_dict`), and calling or reading the model
            meanwhile raises an error saying so; :meth:`close` (or :meth:`release_model`)
            gives it back holding the trained weights. It may be built on the meta device
            (``with torch.device("meta"):``, or :func:`harmony.empty_weights`, which keeps
            buffers real), so that it never exists whole in memory: each layer is then given
            its values from ``init`` or ``weights`` when it is profiled and when its pack is
            built, straight into the pack's home (device, host or NVMe files;
            :mod:`harmony.model.materialize`).
        loss_fn: ``(output, target) -> scalar`` mean loss of one micro-batch.
        config: the settings as one :class:`~harmony.training.config.TrainerConfig` (then no
            other keyword arguments).
        **settings: the settings as keyword arguments (``optimizer``, ``micro_batch_size``,
            ``device``, ``device_memory``, ``host_memory``, ``nvme_dir``, ...), each a field
            of :class:`~harmony.training.config.TrainerConfig`, which says what it means.

    Raises:
        ValueError: a bad argument or a budget that cannot hold the largest layer (or
            ``shard_optimizer=True`` without ``parallel="data"``, an optimizer instance instead
            of a factory, a model another trainer holds, an ``nvme_dir`` that is empty, not a
            path or a file); the message names the value and what to change. Before anything
            is profiled (:mod:`harmony.planning.refusals`): a ``host_memory`` that cannot hold what
            ``device_memory`` does not, without an ``nvme_dir``; an ``nvme_dir`` whose file
            system lacks room for what fits in neither budget; a model already in host memory
            beyond ``host_memory`` (plus ``device_memory`` on CPU), which belongs on the meta
            device.
        TypeError: a keyword argument that is no setting, or settings beside ``config``.
        harmony.WeightsError: ``weights`` unreadable, or missing or misshaping a tensor of
            the model.

    Example::

        trainer = harmony.Trainer(nn.Sequential(...), nn.functional.cross_entropy,
                                  optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-4),
                                  micro_batch_size=4, device_memory="64MiB")
        with trainer:
            for x, y in loader:
                loss = trainer.step(x, y)
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module],
                 loss_fn: Callable[..., torch.Tensor], *, config: TrainerConfig | None = None,
                 **settings: Any) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn={loss_fn!r} is not callable; pass (output, target) -> loss")
        self._config = config = TrainerConfig.of(config, settings)
        setup = set_up(model, config)
        self._holdings = h = setup.holdings
        self._facts = setup.facts
        self.loss_fn = loss_fn
        self.optimizer_factory = setup.optimizer_factory
        self._planner = TrainerPlanner(config, h, loss_fn, given=setup.given,
                                       k_ratio=setup.k_ratio, tied=setup.facts.tied,
                                       device_memory=setup.device_memory,
                                       host_memory=setup.host_memory)
        self._io = StateIO(h, self.optimizer_factory)
        self._recorder = Recorder()
        self._steps = Steps(config, h, self._planner, self._io, setup.facts, loss_fn,
                            self.optimizer_factory, self._recorder)
        self._closed = False
        # The model is the trainer's until close(): touching it meanwhile raises, saying so.
        self._handback = Handback(self, h.chain, h.copies)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], loss_fn: Callable[..., torch.Tensor],
                        model_class: Any = None, **kwargs: Any) -> Trainer:
        """A trainer of the Hugging Face model in directory ``path`` (``config.json`` and
        safetensors weights, as ``save_pretrained`` or :meth:`export` write them), built on
        the meta device and read into its packs' homes one tensor at a time: the model never
        exists whole in memory. Same as ``Trainer(harmony.load_meta(path, model_class),
        loss_fn, weights=path, **kwargs)``; ``trainer.chain.model`` is that model.

        Example::

            trainer = harmony.Trainer.from_pretrained("llama-3b", loss_fn, device="cuda",
                                                      host_memory="8GiB", nvme_dir="/nvme")
        """
        from harmony.model.hf_weights import load_meta

        if isinstance(kwargs.get("config"), TrainerConfig):
            kwargs["config"] = dataclasses.replace(kwargs["config"], weights=path)
            return cls(load_meta(path, model_class), loss_fn, **kwargs)
        return cls(load_meta(path, model_class), loss_fn, weights=path, **kwargs)

    # -- the settings and the owners ---------------------------------------------------------
    @property
    def config(self) -> TrainerConfig:
        """The trainer's settings, as given (frozen)."""
        return self._config

    chain = _held("chain", "The model's chain of layers (``chain.model`` is the model).")
    device = _held("device", "The compute device.")
    precision = _held("precision", "The trainer's Precision (fp16's loss scale lives in it).")
    stats = _held("stats", "Bytes moved, busy and stall seconds, peaks, phase times.")
    tiers = _held("tiers", "The tiers holding the training state, by location.")
    store = _held("store", "The NVMe store (None without ``nvme_dir``).")
    engine = _held("engine", "The swap engine moving this trainer's bytes.")
    pipeline = _held("pipeline", "This rank's pipeline stage (None unless pipelined).")
    micro_batch_size = _setting("micro_batch_size", "Samples per micro-batch, or 'auto'.")
    forward_micro_batch_size = _setting("forward_micro_batch_size",
                                        "Samples per forward (None: one per micro-batch).")
    seed = _setting("seed", "Randomness derives from (seed, step, micro-batch, layer).")
    nonfinite = _setting("nonfinite", "What a non-finite loss does: 'raise' or 'skip'.")
    clip_grad_norm = _setting("clip_grad_norm", "The gradients' global 2-norm bound, or None.")
    lr_scheduler_factory = _setting("lr_scheduler", "The learning-rate scheduler factory.")
    overlap_updates = _setting("overlap_updates", "Whether updates may run on a worker.")
    shard_optimizer = _setting("shard_optimizer", "Whether data-parallel ranks shard K.")

    schedule_name = _planned("schedule_name", "The schedule every plan runs (a given plan's, "
                             "else ``schedule``).")
    prefetch = _planned("prefetch", "The prefetch depth every plan keeps (None: the planner "
                        "chooses).")
    update_chunk = _planned("update_chunk", "The update chunks' budget in bytes, 'auto' or "
                            "None (a given plan's for 'auto'); the plan's is plan.update_chunk.")

    device_memory = _budget("device_memory", """The device budget in bytes (None: no limit).
        Setting it between steps (bytes or a string such as ``"64MiB"``, as at construction)
        makes the next step plan afresh under the new budgets and move the training state to
        the new packs, exactly as for a batch shape the packs cannot hold (README,
        "Placement"); the tier then holds that budget. With data parallelism set it on every
        rank alike. Setting raises ValueError for an unparseable or negative size, naming it,
        with ``parallel="pipeline"`` after the first step (its stages are planned once), or
        on a GPU for a budget that its free memory (with what this trainer's packs hold)
        cannot hold beside the workspaces; the budget then stays as it was.""")
    host_memory = _budget("host_memory", "The host budget in bytes (None: no limit); setting "
                          "it as for :attr:`device_memory`.")

    @property
    def planner(self) -> TrainerPlanner:
        """How this trainer profiles and plans (its profiles, budgets, optimizer-state ratio)."""
        return self._planner

    @property
    def runtime(self) -> Runtime | None:
        """The runtime of the current plan's packs (None before the first step)."""
        built = self._steps.built
        return built.runtime if built is not None else None

    @property
    def plan(self) -> Plan | None:
        """The plan of the last step (None before the first step)."""
        return self._steps.plan

    @property
    def lr_schedulers(self) -> list[Any]:
        """One learning-rate scheduler per pack's optimizer (empty without ``lr_scheduler``
        or before the first step)."""
        return self._steps.lr_schedulers

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (a loaded checkpoint's count, and on from there)."""
        return self._steps.count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._steps.count = value

    @property
    def micro_batch_size_used(self) -> int | None:
        """The micro-batch size of the last step (``micro_batch_size="auto"`` chooses it)."""
        return self._steps.micro_batch_size_used

    # -- training ---------------------------------------------------------------------------
    @acts
    def step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
             targets: torch.Tensor) -> float:
        """Run one optimizer step over the whole batch; returns the batch's mean loss.

        Args:
            inputs: the first layer's input, a tensor or a tuple of tensors, batch first.
            targets: what ``loss_fn`` compares the last layer's output with, batch first.
            With ``parallel="data"``, this rank's share of the batch; the loss returned is
            the mean over every rank's samples.

        Raises:
            ValueError: inputs and targets of different batch sizes, empty batches, or a plan
                that cannot fit the budgets (before anything is changed).
            RuntimeError: with ``parallel="data"``, another rank failed during the step.
        """
        dp = self._holdings.dp
        try:
            if dp is None:
                return self._step(inputs, targets)
            # A failure on this rank tears the process group down, so no other rank hangs.
            # (A non-finite loss or an infeasible plan is raised by every rank alike.)
            with dp.failing_together(passes=(NonFiniteLoss, InfeasiblePlan)):
                return self._step(inputs, targets)
        finally:
            self._handback.built[0] = self._steps.built is not None

    def _step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
              targets: torch.Tensor) -> float:
        self._refuse_if_closed("step()")
        return self._steps.run(inputs, targets, self._profile, self._rehome)

    def _profile(self, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        """Profile the layers on ``(x, y)`` (every profile a step makes goes through here)."""
        self._steps.profile(x, y)

    def _rehome(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                key: ShapeKey) -> Plan:
        """Move the training state to packs of a fresh plan for these shapes (every re-home
        goes through here)."""
        return self._steps.rehome(x, y, sizes, key, self._profile)

    @acts
    def record_step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                    targets: torch.Tensor, path: str | os.PathLike[str]) -> float:
        """Run one :meth:`step` and write what happened to the JSON file ``path``.

        The file holds, per task of the schedule, its start and end (seconds since the step
        began) and the bytes each tier held after it; the step's bytes, busy and stall seconds
        per link and peaks per tier; and the plan with its prediction. On a fresh trainer the
        step recorded is the first one, which also profiles, plans and builds the packs:
        ``"first"`` is then true, ``"planning_seconds"`` holds that time and ``"seconds"`` the
        rest. ``harmony report --run path`` shows measured next to predicted. Returns the
        step's loss.

        Raises:
            OSError: ``path`` cannot be written (a directory, a missing or read-only
                directory, ...); checked before the step, which then does not run.

        Example::

            trainer.record_step(x, y, "step.json")   # then: harmony report --run step.json
        """
        return self._recorder.record(path, lambda: self.step(inputs, targets), self)

    # -- the training state ------------------------------------------------------------------
    @acts
    def state_dict(self, keys: Collection[str] | None = None,
                   inconsistent_ok: bool = False) -> dict[str, torch.Tensor]:
        """The trained weights under the model's own ``state_dict()`` keys, as CPU tensors.

        They are read pack by pack (an NVMe-homed pack chunk by chunk), so that reading them
        takes no more memory than what is returned.

        Args:
            keys: only these keys (a LoRA adapter's, say); None: all.
            inconsistent_ok: give the weights even after a step failed part-way (some packs
                updated, others not), when they are no longer those of one step.

        Raises:
            KeyError: a key of ``keys`` that the model does not have, naming it.
            RuntimeError: a step failed part-way (and ``inconsistent_ok`` is False); the
                message says what happened and how to recover (:meth:`load`).
            MemoryError: they would take more than the memory the system has available; the
                message gives both numbers. :meth:`export` and :meth:`save` write them to disk
                one pack at a time instead.

        Example::

            model.load_state_dict(trainer.state_dict())
        """
        if self._closed:  # (the model it gave back holds them)
            self._refuse_if_closed("state_dict()", model_readable=True)
            return self._io.state_dict(None, keys)
        broken = self._steps.broken
        if broken is not None and not inconsistent_ok:
            raise RuntimeError(f"{broken}. state_dict() refuses such weights; pass "
                               "state_dict(inconsistent_ok=True) to get them anyway")
        return self._io.state_dict(self._steps.built, keys)

    @acts
    def optimizer_state(self) -> OptimizerTensors:
        """The optimizers' state under the model's keys, as :meth:`save` writes it: tensors
        and other values by ``"<parameter key>/<state name>"`` (copies), each pack's
        ``param_groups`` less their parameters (before the first step: what load() read).

        Example::

            tensors, scalars, groups = trainer.optimizer_state()
            tensors["0.weight/exp_avg"]          # AdamW's first moment of that weight
        """
        self._refuse_if_closed("optimizer_state()")  # (gone with the packs)
        return self._io.optimizer.read(self._steps.built)

    @acts
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the full training state under directory ``path``, atomically.

        The checkpoint holds the weights (model ``state_dict`` keys), the optimizer state keyed
        by parameter name, the step count, the seed and the plan; the previous checkpoint in
        ``path`` is replaced only once the new one is complete. Returns the checkpoint's folder.

        With ``parallel="data"`` rank 0 writes and every rank returns the folder (call it on
        every rank).

        Raises:
            OSError: the disk is full or unwritable; the previous checkpoint stays loadable.
            RuntimeError: a step failed part-way (say, interrupted by Ctrl-C after some packs
                were updated), so the weights are not those of one step: nothing is written,
                the checkpoints in ``path`` stay as they are.
        """
        self._refuse_if_closed("save()")
        self._steps.refuse_if_broken("save()", f"the checkpoints already in {str(path)!r} are "
                                         "intact")
        return self._io.save(path, self._steps.built, self.plan, step_count=self.step_count,
                             seed=self.seed, schedule=self.schedule_name,
                             micro_batch_size=self.micro_batch_size)

    @acts
    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore the state :meth:`save` wrote (the newest complete checkpoint under ``path``).

        The whole checkpoint is checked first (every file's SHA-256, ``meta.json``'s fields,
        the weights' keys, shapes and dtypes, the optimizer's class and the parameters its
        state belongs to); only then is anything replaced. Reads only: a training job may save
        into ``path`` meanwhile. Loading makes a trainer whose step failed part-way whole
        again.

        Raises:
            FileNotFoundError: no complete checkpoint there.
            harmony.CheckpointError: a truncated or corrupted file, a malformed ``meta.json``,
                a checkpoint of another model (the message lists the differing keys or shapes)
                or of another optimizer (naming both); nothing is changed.

        Example::

            trainer.load("ckpt")   # then trainer.step_count is the saved step
        """
        self._refuse_if_closed("load()")
        steps = self._steps
        loaded = self._io.read_checkpoint(path, steps.layer_layouts, steps.built)
        steps.broken = (f"load({str(path)!r}) stopped while it replaced the training state, "
                        "so the weights are no longer those of one consistent step: load() a "
                        "checkpoint again before training on")
        # (an exception from here on leaves the trainer refusing to train until a load ends)
        steps.count = self._io.restore(path, loaded, steps.built)
        steps.broken = None

    @acts
    def export(self, path: str | os.PathLike[str],
               max_shard_size: int | str = "5GB") -> Path:
        """Write the trained weights for use without harmony; returns the folder.

        The weights (:meth:`state_dict`'s keys and values) go to ``path/model.safetensors``,
        or, beyond ``max_shard_size`` bytes, to shards ``model-00001-of-0000N.safetensors``
        named by ``model.safetensors.index.json``, as Hugging Face's ``save_pretrained``
        writes them; they are read and written one pack at a time (an NVMe-homed pack chunk
        by chunk), so a model larger than host memory is exported too. For a model from
        Hugging Face transformers, ``path/config.json`` is written as well, so
        ``AutoModelForCausalLM.from_pretrained(path)`` (or the model's class) loads it, and
        ``harmony.model.hf_weights.load_meta(path)`` builds it on the meta device for training. For
        a ``peft`` model, the adapter alone, as its ``save_pretrained`` writes it
        (``adapter_config.json``, ``adapter_model.safetensors``), which
        ``PeftModel.from_pretrained(base_model, path)`` loads (:mod:`harmony.model.hf_export`).
        With ``parallel="pipeline"`` or ``"data"`` every rank calls it and rank 0 writes the
        whole model; the others return once it is written (or raise its error).

        Raises:
            OSError: the disk is full or unwritable (naming the file and the bytes it needs);
                a ``model.safetensors`` already there is left as it was.
            RuntimeError: a step failed part-way, so the weights are not those of one step.

        Example::

            trainer.export("out")   # out/model.safetensors (and out/config.json for HF)
        """
        if self._closed:  # (the model it gave back holds them; no process group is left)
            self._refuse_if_closed("export()", model_readable=self._holdings.dp is None)
            return self._io.export(path, None, max_shard_size)
        self._steps.refuse_if_broken("export()", "nothing in the export folder was changed")
        return self._io.export(path, self._steps.built, max_shard_size)

    def _refuse_if_closed(self, what: str, model_readable: bool = False) -> None:
        """RuntimeError if :meth:`close` ran (see :func:`refuse_if_closed`)."""
        if self._closed:
            refuse_if_closed(what, self._handback.hold, model_readable)

    # -- giving the model back ---------------------------------------------------------------
    @acts
    def close(self) -> None:
        """Give the model back and free buffers, files and threads; idempotent. Afterwards
        :meth:`step`, :meth:`state_dict`, :meth:`optimizer_state`, :meth:`save`, :meth:`load`
        and :meth:`export` raise a ``RuntimeError`` saying the trainer is closed (where the
        model was given back, :meth:`state_dict` and, in one process, :meth:`export` read the
        weights from it).

        The model's parameters and buffers (the same ``Parameter`` objects) then hold the
        trained values, on the devices they came from, when those fit the budgets
        (``host_memory`` for tensors that came from the CPU). Otherwise, and after a step
        that failed part-way, the model is not given back: a warning says why, touching the
        model raises with the same words, and the weights must be kept with :meth:`save` or
        :meth:`export` before closing (:meth:`release_model` refuses instead, while the
        trainer is still open).

        Example::

            trainer.close()
            torch.save(model.state_dict(), "model.pt")   # the trained weights
        """
        self._close(stacklevel=4)  # the warning names the caller: _close, close, acts, caller

    def _close(self, stacklevel: int) -> None:
        """close(), its warning (if any) ``stacklevel`` frames up: at the user's code."""
        if self._closed:
            return
        h = self._holdings
        with contextlib.suppress(Exception):  # (a broken group fails them at once)
            h.weights_arrived()
        why_not = self._why_not_given_back() or self._steps.take_back_spilled()
        self._closed = True
        h.engine.close()
        if self._steps.built is not None:
            why_not = self._steps.built.give_back(self._facts.origin_device, why_not)
        h.close()
        self._handback.finish(why_not)
        if why_not is not None:
            warnings.warn(f"harmony.Trainer.close(): {why_not}", stacklevel=stacklevel)

    @acts
    def release_model(self) -> nn.Module:
        """Close the trainer and return the model it trained, holding the trained weights
        (see :meth:`close`). For a model given as a list of layers, an ``nn.Sequential`` of
        them. To train on later, :meth:`save` first and load into a new trainer.

        Raises:
            RuntimeError: the weights cannot be given back (they exceed the budgets, or a
                step failed part-way); the trainer is left open, so :meth:`save` or
                :meth:`export` can still keep them.

        Example::

            model = trainer.release_model()
            model.eval()(x)
        """
        if not self._closed:
            why_not = self._why_not_given_back() or self._steps.take_back_spilled()
            if why_not is not None:
                raise RuntimeError(f"release_model() refused: {why_not} (the trainer is still "
                                   "open)")
            self.close()
        if self._handback.hold.kept:
            raise RuntimeError(self._handback.hold.message)
        return self.chain.model

    def _why_not_given_back(self) -> str | None:
        """Why close() would not give the model its trained weights (None: it will)."""
        return why_not_given_back(self._steps.built, self._steps.broken, self._holdings.pipeline,
                                  self._facts.origin, self.host_memory, self.device_memory)

    def __enter__(self) -> Trainer:
        return self

    @acts
    def __exit__(self, *exc: object) -> None:
        self._close(stacklevel=4)  # at the with statement: _close, __exit__, acts, the with

