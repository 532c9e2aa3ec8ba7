"""The training state of a :class:`harmony.Trainer`: its weights, optimizer and scheduler state,
read back (:meth:`TrainerState.state_dict`), saved, loaded and exported.

Every key is the model's own ``state_dict()`` key (the optimizer state's too, as
``key/name``), whichever packs the plan makes, so a checkpoint loads across plans, and
re-homing (:mod:`harmony.training.trainer_planning`) hands the state over to new packs the same way,
in memory. :class:`TrainerState` is a base of :class:`harmony.Trainer`, which sets the
attributes declared here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harmony.io import checkpoint
from harmony.io.export import write_shards
from harmony.io.tensor_files import Streamed
from harmony.model.hf_export import adapter_keys, write_adapter, write_config
from harmony.planning.sizes import parse_bytes
from harmony.runtime.pack import NothingToTrain
from harmony.training import streaming
from harmony.training.ownership import acting, acts
from schedules.task import Loc

if TYPE_CHECKING:
    from harmony.model.chain import Chain
    from harmony.model.layout import Layout
    from harmony.model.materialize import Materializer
    from harmony.model.precision import Precision
    from harmony.model.tied import Tie
    from harmony.parallel.data_parallel import DataParallel
    from harmony.parallel.pipeline import Pipeline
    from harmony.planning.planner import Plan
    from harmony.runtime.pack import Pack
    from harmony.runtime.runtime import Runtime
    from swap.nvme import NvmeStore
    from swap.tier import Tier


class TrainerState:
    """The state hand-over part of :class:`harmony.Trainer` (its base class)."""

    # Set by Trainer.__init__ (and the packs it builds on the first step).
    chain: Chain
    device: torch.device
    precision: Precision
    store: NvmeStore | None
    seed: int
    schedule_name: str
    micro_batch_size: int | str
    step_count: int
    lr_schedulers: list[Any]
    _dp: DataParallel | None
    _pipeline: Pipeline | None
    _runtime: Runtime | None
    _plan: Plan | None
    _layer_layouts: list[Layout]
    _ties: list[Tie]
    _first_key: dict[int, str]
    _pending_optimizer: tuple[dict[str, torch.Tensor], dict[str, Any], list[Any]] | None
    _pending_scheduler: dict[str, Any] | None
    _gathered_scheduler: dict[str, Any] | None
    _broken: str | None
    _probed_optimizer: str | None
    optimizer_factory: Any

    _materializer: Materializer
    tiers: dict[Loc, Tier]

    # -- results ----------------------------------------------------------------------------

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
            RuntimeError: a step failed part-way (and ``inconsistent_ok`` is False); the
                message says what happened and how to recover (:meth:`load`).
            MemoryError: they would take more than the memory the system has available; the
                message gives both numbers. :meth:`export` and :meth:`save` write them to disk
                one pack at a time instead.

        Example::

            model.load_state_dict(trainer.state_dict())
        """
        if self._broken is not None and not inconsistent_ok:
            raise RuntimeError(f"{self._broken}. state_dict() refuses such weights; pass "
                               "state_dict(inconsistent_ok=True) to get them anyway")
        self._weights_arrived()
        model_sd = {k: v for k, v in self._model_tensors().items()
                    if keys is None or k in keys}
        tensors = streaming.weights(self)
        streaming.refuse_unless_fits(sum(s.nbytes for s in tensors.specs if s.key in model_sd))
        got = {k: v.cpu().clone() for k, v in tensors.produce() if k in model_sd}
        out = {k: got[k] for k in model_sd}
        if self._pipeline is not None:  # each key from the rank that trains it (collective)
            assert self._runtime is not None
            found = {id(e.tensor) for p in self._runtime.packs for e in p.layout.entries}
            owned = {k for k, v in model_sd.items() if id(v) in found}
            return self._pipeline.gather_state(out, owned)
        return out

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict(keep_vars=True)``, read as the trainer holding it."""
        with acting():
            return self.chain.model.state_dict(keep_vars=True)

    def _masters(self, pack: Pack) -> torch.Tensor:
        """``pack.master_weights()``; with a sharded optimizer in mixed precision, sent from
        the rank owning the pack (collective: every rank calls it for every pack in order)."""
        if pack.owned or not pack.layout.mixed:
            masters = pack.master_weights()
            if self._dp is not None and self._dp.shard and pack.layout.mixed:
                self._dp.send_masters(pack.index, masters)
            return masters
        assert self._dp is not None and self._plan is not None and self._plan.owners
        return self._dp.receive_masters(pack.index, self._plan.owners[pack.index],
                                        pack.layout.g_bytes)

    def _weights_arrived(self) -> None:
        """Sharded optimizer: wait for the weight broadcasts of the last step (each step's
        broadcasts are otherwise waited for by the next use of the pack's weights)."""
        if self._dp is not None:
            self._dp.finish_broadcasts()

    # -- checkpoints ------------------------------------------------------------------------
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
        self._refuse_if_broken("save()", f"the checkpoints already in {str(path)!r} are "
                                         "intact")
        if self._dp is not None:  # rank 0 writes; the others wait for its folder
            if not self._dp.shard:
                return self._dp.save(lambda: self._save(path))
            full = self._full_optimizer_state()
            weights = self.state_dict()  # (collective in mixed precision: the masters)
            return self._dp.save(lambda: self._save(path, full, weights))
        return self._save(path)

    def _refuse_if_broken(self, what: str, intact: str) -> None:
        """RuntimeError if a step failed part-way (the weights mix two steps)."""
        if self._broken is not None:
            raise RuntimeError(f"{what} refused: {self._broken}. Nothing was written; {intact}")

    def _optimizer_name(self) -> str:
        """The optimizer's class (``module.QualName``) the factory builds, from a built pack,
        else from a probe over a stand-in parameter; "" if it cannot be told."""
        if self._runtime is not None:
            for pack in self._runtime.packs:
                if not isinstance(pack.optimizer, NothingToTrain):
                    cls = type(pack.optimizer)
                    return f"{cls.__module__}.{cls.__qualname__}"
        if self._probed_optimizer is None:
            try:
                probe = self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
                cls = type(probe)
                self._probed_optimizer = f"{cls.__module__}.{cls.__qualname__}"
            except Exception:  # a factory that cannot build over a stand-in: not checked
                self._probed_optimizer = ""
        return self._probed_optimizer

    def _full_optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[Any]]:
        """Every pack's optimizer state, gathered from the ranks owning them (sharded
        optimizer; collective). The learning-rate scheduler's state comes from a rank that
        owns a pack, and is kept for the checkpoint."""
        assert self._dp is not None
        tensors, scalars, groups = self._optimizer_state()
        if self._runtime is None:
            return tensors, scalars, groups
        mine = {p: groups[p] for p, pack in enumerate(self._runtime.packs)
                if self._runtime.owns(p)}
        scheduler = self._scheduler_state() if mine else None
        tensors, scalars, all_groups, scheduler = self._dp.gather_optimizer(
            tensors, scalars, mine, scheduler)
        self._gathered_scheduler = scheduler
        return tensors, scalars, all_groups

    def _save(self, path: str | os.PathLike[str],
              optimizer: tuple[dict[str, torch.Tensor], dict[str, Any], list[Any]] | None = None,
              weights: dict[str, torch.Tensor] | None = None) -> Path:
        tensors: dict[str, torch.Tensor] | Streamed
        if self._pipeline is not None:  # rank 0 writes every stage's state (collective)
            tensors, scalars, groups = optimizer if optimizer is not None \
                else self._optimizer_state()
            tensors, scalars, groups = self._pipeline.gather_optimizer(tensors, scalars, groups)
        elif optimizer is not None:
            tensors, scalars, groups = optimizer
        else:  # one pack (or chunk) of the state in memory at a time
            tensors, scalars, groups = streaming.optimizer(self)
        meta = {"step_count": self.step_count, "seed": self.seed,
                "optimizer": self._optimizer_name(),
                "schedule": self.schedule_name, "micro_batch_size": self.micro_batch_size,
                "optimizer_scalars": scalars, "optimizer_groups": groups,
                "lr_scheduler": self._gathered_scheduler if optimizer is not None
                else self._scheduler_state(),
                "precision": self.precision.state_dict(),
                "plan": None if self._plan is None else {
                    "bounds": [list(b) for b in self._plan.bounds],
                    "placement": self._plan.placement.to_json(),
                    "forward_group": self._plan.forward_group}}
        if self._pipeline is not None:
            whole = self.state_dict() if weights is None else weights
            return self._pipeline.on_rank0(
                lambda: checkpoint.save(path, self.step_count, whole, tensors, meta))
        return checkpoint.save(path, self.step_count,
                               streaming.weights(self) if weights is None else weights,
                               tensors, meta)

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
        weights, opt_tensors, meta = checkpoint.load(path)
        self._check_checkpoint(path, weights, opt_tensors, meta)
        current = self._model_tensors()
        self._broken = (f"load({str(path)!r}) stopped while it replaced the training state, "
                        "so the weights are no longer those of one consistent step: load() a "
                        "checkpoint again before training on")
        # (an exception from here on leaves the trainer refusing to train until a load ends)
        if self._runtime is None and self._materializer.meta:
            # A model on the meta device takes these values when its packs are built,
            # read from the checkpoint one tensor at a time.
            self._materializer.use_weights(checkpoint.checkpoint_dir(path))
        homes, flats = self._home_views()
        with torch.no_grad():
            for k, v in current.items():
                if v.is_meta:
                    continue
                for home in homes.get(id(v), [v]):
                    home.copy_(weights[k])
        for pack, kind, flat in flats:  # weights that live on NVMe go back to their files
            pack.write_flat(kind, flat)
        self._pending_optimizer = (opt_tensors, meta["optimizer_scalars"],
                                   meta["optimizer_groups"])
        self._pending_scheduler = meta.get("lr_scheduler")
        if self._runtime is not None:
            self._apply_optimizer_state()
            self._apply_scheduler_state()
        self.precision.load_state_dict(meta.get("precision"))  # fp16's loss scale
        self.step_count = int(meta["step_count"])
        self._broken = None

    def _check_checkpoint(self, path: str | os.PathLike[str],
                          weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not fit this trainer (CheckpointError naming what
        differs), before anything is replaced."""
        checkpoint.check_training_meta(meta, path)
        current = self._model_tensors()
        # What each key holds at full precision (a parameter may be bound to a W view in the
        # compute dtype, or to an empty tensor while its pack is away).
        own = {id(e.tensor): (e.shape, e.master_dtype) for layout in self._layer_layouts
               for e in layout.entries}
        missing, extra = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
        if missing or extra:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} is of another model: missing {missing[:5]}, unexpected "
                f"{extra[:5]}")
        for k, v in current.items():
            shape, dtype = own.get(id(v), (v.shape, v.dtype))
            if weights[k].shape != shape or weights[k].dtype != dtype:
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} is of another model: {k} is {tuple(weights[k].shape)} "
                    f"{weights[k].dtype} there, {tuple(shape)} {dtype} here")
        saved, mine = meta.get("optimizer") or "", self._optimizer_name()
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
        With ``parallel="pipeline"`` every rank calls it and rank 0 writes the whole model.

        Raises:
            OSError: the disk is full or unwritable (naming the file and the bytes it needs);
                a ``model.safetensors`` already there is left as it was.
            RuntimeError: a step failed part-way, so the weights are not those of one step.

        Example::

            trainer.export("out")   # out/model.safetensors (and out/config.json for HF)
        """
        self._refuse_if_broken("export()", "nothing in the export folder was changed")
        out = Path(path)
        shard = parse_bytes(max_shard_size, "max_shard_size")
        if not shard:
            raise ValueError(f"max_shard_size={max_shard_size!r} must be a positive size, "
                             "e.g. '5GB'")
        adapter = adapter_keys(self.chain.model)  # None unless a peft model
        weights: dict[str, torch.Tensor] | Streamed
        if self._pipeline is not None or adapter is not None:
            weights = self.state_dict(adapter)  # (collective with pipeline stages)
            if self._pipeline is not None and self._pipeline.rank != 0:
                return out
        else:
            weights = streaming.weights(self)
        out.mkdir(parents=True, exist_ok=True)
        if adapter is not None:
            assert isinstance(weights, dict)
            return write_adapter(self.chain.model, weights, out)
        write_shards(out, weights, shard)
        write_config(self.chain.model, out)
        return out

    def _home_views(self) -> tuple[dict[int, list[torch.Tensor]],
                                   list[tuple[Pack, str, torch.Tensor]]]:
        """Views of every weight's home copies (W, and the fp32 masters in mixed precision),
        and the flat copies read from NVMe with their pack and kind (``"W"``, ``"M"``)."""
        self._weights_arrived()
        if self._runtime is None:
            return {}, []
        views: dict[int, list[torch.Tensor]] = {}
        flats = []
        for pack in self._runtime.packs:
            flat = pack.home_weights()
            if pack.home_w is None:
                flats.append((pack, "W", flat))
            for e in pack.layout.entries:
                views[id(e.tensor)] = [e.view(flat)]
            if pack.layout.mixed and pack.owned:  # (another rank's pack: it has the masters)
                masters = pack.master_weights()
                if pack.home_m is None:
                    flats.append((pack, "M", masters))
                for e in pack.layout.trainable:
                    views[id(e.tensor)].append(e.gview(masters))
        return views, flats

    @contextlib.contextmanager
    def _state_in_memory(self, pack: Pack, write_back: bool) -> Iterator[None]:
        """Bind an NVMe pack's masters and optimizer state to host copies for the body."""
        if pack.home is not Loc.NVME or not pack.owned:
            yield
            return
        assert self.store is not None
        flat = pack.master_weights()
        pack.bind_masters(flat)
        chunks = range(len(pack.chunks))
        for c in chunks:  # (each chunk's state from its file)
            if pack.state_laid_out(c):
                k = torch.empty(pack.k_sizes[c], dtype=torch.uint8)
                self.store.read(pack.key("K", c), k).synchronize()
                pack.bind_state(c, k)
        try:
            yield
            if write_back:
                for c in chunks:
                    pack.layout_state(c)
                    if pack.k_layouts[c] is not None:
                        k = torch.empty(pack.k_sizes[c], dtype=torch.uint8)
                        pack.bind_state(c, k, copy_in=True)
                        self.store.write(pack.key("K", c), k).synchronize()
                pack.settle_optimizer_bytes()
        finally:
            pack.bind_masters(None)
            for c in chunks:
                if pack.k_layouts[c] is not None:
                    pack.bind_state(c, None)

    def _param_keys(self, pack: Pack) -> dict[int, str]:
        key_of = {id(v): k for k, v in self._model_tensors().items()}
        key_of.update(self._first_key)
        return {id(m): key_of[id(e.tensor)] for m, e in zip(pack.masters, pack.layout.trainable)}

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[Any]]:
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        groups: list[Any] = []
        if self._runtime is None:
            return tensors, scalars, groups
        for pack in self._runtime.packs:
            keys = self._param_keys(pack)
            order = [p for g in pack.optimizer.param_groups for p in g["params"]]
            with self._state_in_memory(pack, write_back=False):
                sd = pack.optimizer.state_dict()
                sd["state"] = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in s.items()} for i, s in sd["state"].items()}
            for idx, state in sd["state"].items():
                key = keys[id(order[idx])]
                for name, val in state.items():
                    if isinstance(val, torch.Tensor):
                        tensors[f"{key}/{name}"] = val
                    else:
                        scalars[f"{key}/{name}"] = val
            groups.append([{k: v for k, v in g.items() if k != "params"}
                           for g in sd["param_groups"]])
        return tensors, scalars, groups

    def _scheduler_state(self) -> dict[str, Any] | None:
        """The learning-rate schedulers' state (the same for every pack) as JSON data."""
        if not self.lr_schedulers:
            return self._pending_scheduler
        # (a scheduler of a pack this rank trains: a sharded optimizer's other packs have none)
        state = next((s for s in self.lr_schedulers if s.optimizer.param_groups),
                     self.lr_schedulers[0]).state_dict()
        try:
            json.dumps(state)
        except TypeError as err:
            raise ValueError(f"the learning-rate scheduler's state_dict() holds values JSON "
                             f"cannot store ({err}); use a scheduler whose state is plain "
                             "numbers (StepLR, LambdaLR, CosineAnnealingLR, ...)") from err
        return state

    def _apply_scheduler_state(self) -> None:
        if self._pending_scheduler is None or not self.lr_schedulers:
            return
        for scheduler in self.lr_schedulers:
            scheduler.load_state_dict(dict(self._pending_scheduler))
        self._pending_scheduler = None

    def _apply_optimizer_state(self) -> None:
        assert self._runtime is not None
        if self._pending_optimizer is None:
            return
        tensors, scalars, groups = self._pending_optimizer
        # A pipeline rank's packs are the checkpoint's packs from its first one on.
        offset = self._pipeline.first_pack if self._pipeline is not None else 0
        for i, pack in enumerate(self._runtime.packs, start=offset):
            keys = self._param_keys(pack)
            order = [p for g in pack.optimizer.param_groups for p in g["params"]]
            state: dict[int, dict[str, Any]] = {}
            for idx, param in enumerate(order):
                prefix = keys[id(param)] + "/"
                entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                entry.update({k[len(prefix):]: v for k, v in scalars.items()
                              if k.startswith(prefix)})
                if entry:
                    state[idx] = entry
            sd = pack.optimizer.state_dict()
            saved = groups[i] if i < len(groups) and len(groups[i]) == len(sd["param_groups"]) \
                else (groups[0] if groups else [])
            new_groups = [{**s, "params": g["params"]}
                          for g, s in zip(sd["param_groups"], saved)] or sd["param_groups"]
            with self._state_in_memory(pack, write_back=bool(state)):
                pack.optimizer.load_state_dict({"state": state, "param_groups": new_groups})
            pack.settle_optimizer_bytes()
        self._pending_optimizer = None
