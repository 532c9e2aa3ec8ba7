"""A trainer's training state read back, saved, loaded and exported.

Every key is the model's own ``state_dict()`` key (the optimizer state's too, as
``key/name``: :mod:`harmony.training.optimizer_state`), whichever packs the plan makes, so a
checkpoint loads across plans. Weights are read pack by pack, an NVMe-homed pack chunk by chunk
(:mod:`harmony.training.streaming`), so that a model larger than host memory is saved and
exported too. :class:`StateIO` does the reading and writing for :class:`harmony.Trainer`, which
refuses first when a step failed part-way (the weights then mix two steps).

Example::

    io = StateIO(holdings, optimizer_factory)
    io.save("ckpt", built, plan, step_count=100, seed=0, schedule="harmony",
            micro_batch_size=4)
    loaded = io.read_checkpoint("ckpt", layouts, built)   # checked; nothing changed yet
    io.restore("ckpt", loaded, built)                     # the step count it was saved at
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harmony.io import checkpoint
from harmony.io.export import write_shards
from harmony.io.tensor_files import FileTensors, Streamed, TensorSpec, write_safetensors
from harmony.model.hf_export import adapter_keys, write_adapter, write_config
from harmony.planning.sizes import parse_bytes
from harmony.training import streaming
from harmony.training.optimizer_state import OptimizerState, OptimizerTensors

if TYPE_CHECKING:
    from harmony.model.layout import Layout
    from harmony.planning.plan import Plan
    from harmony.training.built import Built
    from harmony.training.holdings import Holdings

__all__ = ["Loaded", "StateIO"]


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read and checked against the trainer, not yet applied."""

    weights: FileTensors  # (each read from disk when looked up)
    optimizer_tensors: FileTensors
    meta: dict[str, Any]


@dataclass
class Spilled:
    """A trainer's state written out for a re-home (:meth:`StateIO.spill`): the weights' file,
    each weight's dtype and shape (full precision), and the optimizer and scheduler state,
    its tensors read from their file as they are looked up."""

    weights_file: Path
    specs: dict[str, TensorSpec]
    optimizer: OptimizerTensors
    scheduler: dict[str, Any] | None


class StateIO:
    """Reads, saves, loads and exports a trainer's training state (see the module docstring).

    Args:
        holdings: the trainer's surroundings (model, tiers, store, process groups).
        optimizer_factory: the factory the packs' optimizers come from.

    Attributes:
        optimizer: the optimizer and scheduler state, and what is pending for the next packs.
    """

    def __init__(self, holdings: Holdings,
                 optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self.holdings = holdings
        self.optimizer = OptimizerState(holdings, optimizer_factory)

    # -- reading ---------------------------------------------------------------------------
    def state_dict(self, built: Built | None, keys: Collection[str] | None = None,
                   ) -> dict[str, torch.Tensor]:
        """The weights as :meth:`harmony.Trainer.state_dict` gives them (only ``keys``, if
        given).

        Raises:
            KeyError: a key of ``keys`` that the model's ``state_dict()`` does not have.
            MemoryError: they would take more than the memory the system has available.
        """
        h = self.holdings
        if isinstance(keys, str):  # (one key; its characters are no keys)
            keys = [keys]
        tensors_by_key = h.model_tensors()
        unknown = sorted(set(keys) - tensors_by_key.keys()) if keys is not None else []
        if unknown:  # (a typo would otherwise give an empty or partial dict, silently)
            raise KeyError(f"state_dict(keys=...): the model has no {unknown[:5]} "
                           f"({len(unknown)} unknown); its keys are those of "
                           f"model.state_dict(), e.g. {list(tensors_by_key)[:3]}")
        h.weights_arrived()
        model_sd = {k: v for k, v in tensors_by_key.items() if keys is None or k in keys}
        tensors = streaming.weights(h, built)
        streaming.refuse_unless_fits(sum(s.nbytes for s in tensors.specs if s.key in model_sd))
        got = {k: v.cpu().clone() for k, v in tensors.produce() if k in model_sd}
        out = {k: got[k] for k in model_sd}
        if h.pipeline is not None and built is not None:
            # Each key from the rank that trains it (collective). Before the first step
            # every rank holds the whole model, untrained: its own weights are the answer.
            found = {id(e.tensor) for p in built.packs for e in p.layout.entries}
            owned = {k for k, v in model_sd.items() if id(v) in found}
            return h.pipeline.gather_state(out, owned)
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], built: Built | None, plan: Plan | None, *,
             step_count: int, seed: int, schedule: str, micro_batch_size: int | str) -> Path:
        """Write a checkpoint as :meth:`harmony.Trainer.save` does; returns its folder.

        Raises:
            OSError: the disk is full or unwritable; the previous checkpoint stays loadable.
        """
        def write(optimizer: OptimizerTensors | None = None,
                  weights: dict[str, torch.Tensor] | None = None) -> Path:
            return self._save(path, built, plan, optimizer, weights, step_count=step_count,
                              seed=seed, schedule=schedule, micro_batch_size=micro_batch_size)

        dp = self.holdings.dp
        if dp is not None:  # rank 0 writes; the others wait for its folder
            if not dp.shard:
                return dp.save(write)
            full = self.optimizer.gather(built)
            weights = self.state_dict(built)  # (collective in mixed precision: the masters)
            return dp.save(lambda: write(full, weights))
        return write()

    def _save(self, path: str | os.PathLike[str], built: Built | None, plan: Plan | None,
              optimizer: OptimizerTensors | None, weights: dict[str, torch.Tensor] | None, *,
              step_count: int, seed: int, schedule: str, micro_batch_size: int | str) -> Path:
        h = self.holdings
        tensors: Mapping[str, torch.Tensor] | Streamed
        if h.pipeline is not None:  # rank 0 writes every stage's state (collective)
            tensors, scalars, groups = optimizer if optimizer is not None \
                else self.optimizer.read(built)
            tensors, scalars, groups = h.pipeline.gather_optimizer(tensors, scalars, groups)
        elif optimizer is not None:
            tensors, scalars, groups = optimizer
        elif built is None and self.optimizer.pending is not None:
            # loaded (or handed over) and not applied yet: a checkpoint's is read as written
            tensors, scalars, groups = self.optimizer.pending
        else:  # one pack (or chunk) of the state in memory at a time
            tensors, scalars, groups = streaming.optimizer(h, built)
        meta = {"step_count": step_count, "seed": seed,
                "optimizer": self.optimizer.optimizer_name(built),
                "schedule": schedule, "micro_batch_size": micro_batch_size,
                "optimizer_scalars": scalars, "optimizer_groups": groups,
                "lr_scheduler": self.optimizer.gathered_scheduler if optimizer is not None
                else self.optimizer.scheduler(built),
                "precision": h.precision.state_dict(),
                "plan": None if plan is None else {
                    "bounds": [list(b) for b in plan.bounds],
                    "placement": plan.placement.to_json(),
                    "forward_group": plan.forward_group}}
        if h.pipeline is not None:
            whole = self.state_dict(built) if weights is None else weights
            return h.pipeline.on_rank0(
                lambda: checkpoint.save(path, step_count, whole, tensors, meta))
        return checkpoint.save(path, step_count,
                               streaming.weights(h, built) if weights is None else weights,
                               tensors, meta)

    def read_checkpoint(self, path: str | os.PathLike[str], layouts: list[Layout],
                        built: Built | None) -> Loaded:
        """The newest complete checkpoint under ``path``, checked against this trainer's model
        (its layers' ``layouts``) and optimizer; nothing is changed.

        Raises:
            FileNotFoundError: no complete checkpoint there.
            harmony.CheckpointError: a damaged checkpoint, or one of another model or
                optimizer, naming what differs.
        """
        weights, opt_tensors, meta = checkpoint.load(path)
        checkpoint.check_training_meta(meta, path)
        current = self.holdings.model_tensors()
        # What each key holds at full precision (a parameter may be bound to a W view in the
        # compute dtype, or to an empty tensor while its pack is away).
        own = {id(e.tensor): (e.shape, e.master_dtype) for layout in layouts
               for e in layout.entries}
        missing, extra = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
        if missing or extra:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} is of another model: missing {missing[:5]}, unexpected "
                f"{extra[:5]}")
        for k, v in current.items():
            shape, dtype = own.get(id(v), (v.shape, v.dtype))
            saved_spec = weights.spec(k)  # (from the header: no tensor is read here)
            if saved_spec.shape != tuple(shape) or saved_spec.dtype != dtype:
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} is of another model: {k} is {saved_spec.shape} "
                    f"{saved_spec.dtype} there, {tuple(shape)} {dtype} here")
        saved, mine = meta.get("optimizer") or "", self.optimizer.optimizer_name(built)
        if saved and mine and saved != mine:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} holds the state of a {saved.rpartition('.')[2]} optimizer "
                f"({saved}), but this trainer's optimizer factory builds "
                f"{mine.rpartition('.')[2]} ({mine}); load it into a trainer with the same "
                "optimizer, or load only its weights: model.load_state_dict(harmony."
                "checkpoint.load(path)[0])")
        trainable = {k for k, v in current.items()
                     if isinstance(v, torch.nn.Parameter) and v.requires_grad}
        for name in list(opt_tensors) + list(meta["optimizer_scalars"]):
            key, sep, _ = name.rpartition("/")
            if not sep or key not in trainable:
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} holds optimizer state {name!r} for no trainable "
                    f"parameter of this model (its trainable parameters are "
                    f"{sorted(trainable)[:5]}...); it is of another model")
        return Loaded(weights, opt_tensors, meta)

    def restore(self, path: str | os.PathLike[str], loaded: Loaded, built: Built | None) -> int:
        """Replace the weights, optimizer and scheduler state and fp16's loss scale with
        ``loaded``'s (read from ``path``); returns the step count it was saved at. An
        exception part-way leaves the state mixed: the trainer marks itself until a load
        ends."""
        h = self.holdings
        current = h.model_tensors()
        from_files = built is None and h.materializer.active
        if from_files:
            # Packs not built yet take their values from files (a model on the meta device,
            # weights= files, a re-home's files after its build failed): from now on the
            # checkpoint's, read one tensor at a time when the packs are built.
            h.materializer.use_weights(checkpoint.checkpoint_dir(path))
        keys: dict[int, str] = {}  # (a tied weight is one tensor under several keys)
        for k, v in current.items():
            if not v.is_meta and not (from_files and h.materializer.direct(v)):
                keys.setdefault(id(v), k)
        homed: set[int] = set()
        with torch.no_grad():
            # pack by pack (one NVMe pack's weights in memory at a time), each key read
            # from the checkpoint's file as it is copied
            for views in self._pack_homes(built):
                for tensor_id, homes in views.items():
                    if tensor_id in keys:
                        value = loaded.weights[keys[tensor_id]]
                        for home in homes:
                            home.copy_(value)
                        homed.add(tensor_id)
            for k, v in current.items():
                if id(v) in keys and id(v) not in homed:
                    v.copy_(loaded.weights[k])
        meta = loaded.meta
        self.optimizer.pending = (loaded.optimizer_tensors, meta["optimizer_scalars"],
                                  meta["optimizer_groups"])
        self.optimizer.pending_scheduler = meta.get("lr_scheduler")
        if built is not None:
            self.optimizer.apply_pending(built)
        h.precision.load_state_dict(meta.get("precision"))  # fp16's loss scale
        return int(meta["step_count"])

    def export(self, path: str | os.PathLike[str], built: Built | None,
               max_shard_size: int | str) -> Path:
        """Write the weights as :meth:`harmony.Trainer.export` does; returns the folder.

        Raises:
            ValueError: ``max_shard_size`` is not a positive size.
            OSError: the disk is full or unwritable.
        """
        h = self.holdings
        out = Path(path)
        shard = parse_bytes(max_shard_size, "max_shard_size")
        if not shard:
            raise ValueError(f"max_shard_size={max_shard_size!r} must be a positive size, "
                             "e.g. '5GB'")
        adapter = adapter_keys(h.chain.model)  # None unless a peft model
        dp = h.dp
        weights: dict[str, torch.Tensor] | Streamed
        if h.pipeline is not None or adapter is not None or (dp is not None and dp.shard):
            # (collective with pipeline stages, and with a sharded optimizer, whose owners
            # hold the fp32 masters in mixed precision: every rank reads, rank 0 writes)
            weights = self.state_dict(built, adapter)
            if h.pipeline is not None and h.pipeline.rank != 0:
                return out
        else:
            weights = streaming.weights(h, built)

        def write() -> Path:
            out.mkdir(parents=True, exist_ok=True)
            if adapter is not None:
                assert isinstance(weights, dict)
                return write_adapter(h.chain.model, weights, out)
            write_shards(out, weights, shard)
            write_config(h.chain.model, out)
            return out

        if dp is not None:  # one writer (ranks writing the same files would race); the others
            return dp.save(write, "the export")  # wait for it and raise its error
        return write()

    def spill(self, built: Built, directory: Path) -> Spilled:
        """Write the weights and the optimizer state to safetensors files in ``directory``, one
        pack (an NVMe-homed one chunk by chunk) in memory at a time: a re-home's hand-over to
        new packs where the state may exceed host memory (the NVMe directory holds it).

        Raises:
            OSError: the disk is full or unwritable (the files may be partial: the caller
                removes ``directory``); nothing else changed.
        """
        h = self.holdings
        weights = streaming.weights(h, built)
        weights_file = directory / "model.safetensors"
        write_safetensors(weights_file, weights, todo="free space in nvme_dir")
        tensors, scalars, groups = streaming.optimizer(h, built)
        write_safetensors(directory / "optimizer.safetensors", tensors,
                          todo="free space in nvme_dir")
        return Spilled(weights_file, {s.key: s for s in weights.specs},
                       (FileTensors(directory / "optimizer.safetensors"), scalars, groups),
                       self.optimizer.scheduler(built))

    def _pack_homes(self, built: Built | None) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Per pack, views of its weights' home copies (W, and the fp32 masters in mixed
        precision) by weight; a pack homed on NVMe is read for it, and written back to its
        files once the caller has filled the views (one pack's weights in memory at a time)."""
        self.holdings.weights_arrived()
        if built is None:
            return
        for pack in built.packs:
            flat = pack.home_weights()
            views = {id(e.tensor): [e.view(flat)] for e in pack.layout.entries}
            masters = None
            if pack.layout.mixed and pack.owned:  # (another rank's pack: it has the masters)
                masters = pack.master_weights()
                for e in pack.layout.trainable:
                    views[id(e.tensor)].append(e.gview(masters))
            yield views
            if pack.home_w is None:
                pack.write_flat("W", flat)
            if masters is not None and pack.home_m is None:
                pack.write_flat("M", masters)
