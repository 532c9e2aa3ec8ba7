"""A trainer's settings: one frozen value that checks itself.

:class:`TrainerConfig` holds every setting of :class:`harmony.Trainer` (all but the model and
the loss function) as the user gave it, and refuses a bad value when it is made, naming the
value and what to give instead. ``Trainer(model, loss_fn, **settings)`` builds one from its
keyword arguments; ``Trainer(model, loss_fn, config=TrainerConfig(...))`` takes one made
beforehand (the same settings for several trainers, or checked before any model exists).

The config checks what can be told from the values alone; what needs the machine or the
model (a CUDA device's memory, the process group, an ``nvme_dir`` on disk, a ``plan`` file,
budgets against the layers) the trainer checks as it builds.

>>> config = TrainerConfig(micro_batch_size=4, device_memory="64MiB")
>>> config.device_memory_bytes, config.forward_group
(67108864, 1)
>>> TrainerConfig(schedule="fast")
Traceback (most recent call last):
    ...
ValueError: schedule='fast' is unknown; choose one of ['harmony', 'per-microbatch', 'resident']
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harmony.model.precision import Precision
from harmony.planning.chunks import parse_update_chunk
from harmony.planning.groups import forward_group_of
from harmony.planning.plan import Plan
from harmony.planning.sizes import parse_bytes
from harmony.training.user_checks import check_lr_scheduler_factory, check_optimizer_factory
from schedules.generators import GENERATORS

__all__ = ["OptimizerFactory", "TrainerConfig", "default_optimizer"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer a trainer builds when given none: AdamW(lr=1e-3)."""
    return torch.optim.AdamW(params, lr=1e-3)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainerConfig:
    """Every setting of a :class:`harmony.Trainer`, checked when made.

    Attributes:
        optimizer: a factory ``params -> torch.optim.Optimizer``; one optimizer is built per pack
            over that pack's parameters, and it must hold exactly those (per-parameter
            optimizers such as SGD and AdamW give the same update as one optimizer over the
            whole model). Default: AdamW(lr=1e-3). An optimizer instance is refused.
        micro_batch_size: samples per micro-batch; a batch is split with ``torch.split`` (the last
            micro-batch may be smaller) and each micro-batch's loss is weighted by its share of the
            samples, so a step equals one full-batch step. ``"auto"``: the largest size (the batch,
            or a power of two below it) for which the planner finds a plan within the budgets,
            chosen per batch shape (:attr:`harmony.Trainer.micro_batch_size_used` tells which).
        forward_micro_batch_size: samples per forward (a multiple of ``micro_batch_size``):
            with ``schedule="harmony"``, each pack whose layers allow it runs one forward
            over that many samples (several micro-batches concatenated), and backward still
            recomputes per micro-batch, so gradients are those of the micro-batches; packs
            with a layer that draws random numbers (dropout), changes buffers or mixes
            samples (BatchNorm in training mode) run per micro-batch (``plan.describe``
            says which layer and why). Results then equal plain PyTorch's accumulation up to
            the rounding of larger matrix products (not bit for bit). ``"auto"``: the planner
            chooses the size (or none) with the lowest predicted step time within the
            budgets. Default None: a forward per micro-batch, bitwise exact.
        device: the compute device, ``"cpu"`` or ``"cuda[:i]"`` (``"cuda"``: the current
            GPU). A CUDA device becomes the process's current device
            (``torch.cuda.set_device``), as its copy streams and generators are that GPU's.
        device_memory, host_memory: budgets in bytes or strings such as ``"8GiB"``; None means
            no limit.
        nvme_dir: an existing, writable directory (ideally on an NVMe drive) for the NVMe tier;
            None: no NVMe tier. harmony works in a private subdirectory it removes on close.
        nvme_backend: ``"auto"`` (DeepSpeed's async I/O op when it is built, else O_DIRECT
            threads), ``"aio"``, ``"odirect"`` or ``"buffered"``.
        update_chunk: how the update of a pack homed on NVMe streams its weights, fp32 masters
            and optimizer state through host memory (:mod:`harmony.runtime.chunked_update`): in
            chunks of whole parameters of at most this many bytes (an int, or e.g.
            ``"64MiB"``; a parameter larger than that is a chunk by itself), three chunks in
            host memory at a time, the next one's reads and the last one's writes overlapping
            the step; None: the whole pack at once; ``"auto"`` (default): the whole pack if
            the plan fits the host budget so, else the largest chunks that fit
            (``trainer.plan.update_chunk`` says which). The optimizer's ``step()`` is then
            called once per chunk with gradients on that chunk's parameters only, as
            per-parameter optimizers (SGD, Adam, AdamW, DeepSpeedCPUAdam) allow. Pipeline
            stages update whole packs.
        overlap_updates: run the optimizer step of each pack whose weights and optimizer
            state live on the host or NVMe on a worker thread, behind the next pack's
            backward (:mod:`harmony.runtime.update_worker`); whatever next touches that pack waits
            for it, counted as ``stats.stall_seconds["update"]``. The pack's gradients stay
            on the host until then, and an NVMe-homed pack's update holds a reservation of
            the host bytes of three chunks until then, which the planner accounts for; where
            only a plan updating in line fits the host budget, it updates in line
            (``trainer.plan.overlap_updates`` says which). A pack's first update (it creates
            the optimizer state) and NVMe-homed packs with tied weights update in line. Worth
            it where the backward runs on a GPU; on a CPU the two compete for the cores. Not
            with ``shard_optimizer`` (the broadcast follows the step at once) nor with
            pipeline stages (ValueError). Default False.
        clip_grad_norm: clip the gradients' global 2-norm to this value before each update,
            as ``torch.nn.utils.clip_grad_norm_`` over the whole model does; the schedule then
            runs every update after the last backward (the norm needs every gradient).
        lr_scheduler: a factory ``optimizer -> torch.optim.lr_scheduler.LRScheduler``; one is
            built per pack's optimizer and all step after every optimizer step, so every pack
            follows the schedule one scheduler over the whole model would (saved and loaded
            with checkpoints). What it returns is checked before the first update: it needs
            ``step()``, ``state_dict()`` and ``load_state_dict()``, and ``ReduceLROnPlateau``
            (which steps on a metric) is refused.
        plan: a :class:`Plan`, or the JSON file ``harmony report --json`` wrote: keep its pack
            boundaries, placement, schedule and prefetch depth instead of planning (the
            budgets are still checked against them on the first step).
        schedule: ``"harmony"`` (layer-major, the default), ``"per-microbatch"`` or
            ``"resident"`` (no swapping, no recompute: plain gradient accumulation).
        prefetch: how many packs ahead weights are loaded; None lets the planner choose.
        seed: randomness (dropout) derives from (seed, step, micro-batch, layer).
        nonfinite: what a NaN or infinite batch loss does: ``"raise"`` :class:`NonFiniteLoss`,
            or ``"skip"`` the step (no weight changes, ``step_count`` stays, the NaN is
            returned and ``stats.skipped_steps`` counts it).
        precision: ``"fp32"`` (the default: exact), ``"bf16"`` or ``"fp16"``, or a
            :class:`harmony.model.precision.Precision` (fp16's loss-scaling settings): weights
            compute and move in the low dtype under ``torch.autocast``, gradients accumulate in
            fp32, and fp32 master weights live with the optimizer state;
            :meth:`harmony.Trainer.state_dict` gives the masters. fp16 skips (and counts in
            ``stats.skipped_steps``) steps whose gradients overflow; its current loss scale is
            ``trainer.precision.scale`` (the trainer keeps its own copy of a given Precision). See
            :mod:`harmony.model.precision`.
        parallel: None (or ``"none"``): one process. ``"data"``: data parallelism over the ranks of
            the default ``torch.distributed`` group (initialized from torchrun's environment when
            there is none; NCCL on CUDA, gloo on CPU). As with DDP, each rank passes its own share
            of the batch to :meth:`harmony.Trainer.step`, and a step equals one process's step on
            all ranks' samples together (each sample's loss weighs 1 / global samples);
            ``device="cuda"`` means GPU ``LOCAL_RANK``; rank 0 writes checkpoints. See
            :mod:`harmony.parallel.data_parallel` (and ``shard_optimizer``). ``"pipeline"``: run
            under ``torchrun`` with one process per stage; the packs are split into contiguous
            stages, one per rank, and activations pass between neighbouring ranks (see
            :mod:`harmony.parallel.pipeline`). Every rank calls :meth:`harmony.Trainer.step` with
            the same global batch (only the first stage reads the inputs, only the last the targets)
            and gets the batch loss back; :meth:`harmony.Trainer.state_dict` and
            :meth:`harmony.Trainer.save` are then collective (every rank calls them).
        stages: with ``parallel="pipeline"``, the ``[start, stop)`` layers of each rank's
            stage, e.g. ``[(0, 6), (6, 12)]``; None balances packs by profiled compute time.
        shard_optimizer: with ``parallel="data"``, give each pack one owner rank (balanced by
            optimizer-state bytes): its gradients are reduced onto the owner, only the owner holds
            and steps its optimizer state (and is charged for it: host memory for K falls to about
            1/N per rank), and it broadcasts the updated weights to the other ranks before the step
            ends. Global-norm clipping sums the owners' squared norms over the ranks (fp16's
            overflow check agrees likewise); :meth:`harmony.Trainer.save` gathers the whole
            optimizer state into the checkpoint (loadable sharded or not). In mixed precision only
            the owner keeps a pack's fp32 masters, so :meth:`harmony.Trainer.state_dict` is
            collective then. Not with tied weights yet. Default False (every rank holds every pack's
            state).
        check_chain: before the first step, check on a slice of the first micro-batch that the
            chain harmony split the model into by itself (an ``nn.Sequential``, a Hugging
            Face model) computes the model's output and gradients (:mod:`harmony.model.probe`);
            a chain that does not is refused with :class:`harmony.model.probe.ChainMismatch`.
            False skips the check. Chains declared by ``harmony_chain()`` are not checked.

        init: for a model on the meta device, ``layer -> None`` initializing one layer's
            parameters (and meta buffers) in place, run under torch's generator seeded from
            ``(seed, layer index)``; default :func:`~harmony.model.materialize.default_init` (each
            module's ``reset_parameters()``, or a Hugging Face model's ``_init_weights``).
            What it leaves unset is refused by name.
        weights: a safetensors file, a directory with ``model.safetensors`` or shards and
            ``model.safetensors.index.json`` (Hugging Face's layout), or a harmony
            checkpoint directory: every tensor it holds is read from it, one tensor at a time,
            into its pack's home (:mod:`harmony.io.weights`; never unpickled). For a model on
            the meta device or built normally.

    Raises:
        ValueError: a value that is wrong by itself or with another setting (an optimizer
            instance instead of a factory, an unknown schedule, ``shard_optimizer`` without
            ``parallel="data"``, an unparseable budget, ...); the message names the value
            and what to give instead.
        RuntimeError: ``device`` is not a device torch knows.

    Example::

        config = TrainerConfig(micro_batch_size=4, device_memory="8GiB", nvme_dir="/nvme")
        trainer = harmony.Trainer(model, loss_fn, config=config)
    """

    optimizer: OptimizerFactory | None = None
    micro_batch_size: int | str = 1
    device: str | torch.device = "cpu"
    device_memory: int | str | None = None
    host_memory: int | str | None = None
    nvme_dir: str | os.PathLike[str] | None = None
    schedule: str = "harmony"
    prefetch: int | None = None
    seed: int = 0
    nonfinite: str = "raise"
    nvme_backend: str = "auto"
    plan: Plan | str | os.PathLike[str] | None = None
    clip_grad_norm: float | None = None
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    precision: str | Precision = "fp32"
    parallel: str | None = None
    stages: Sequence[tuple[int, int]] | None = None
    shard_optimizer: bool = False
    forward_micro_batch_size: int | str | None = None
    update_chunk: int | str | None = "auto"
    overlap_updates: bool = False
    check_chain: bool = True
    init: Callable[[nn.Module], None] | None = None
    weights: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        # (in the order the checks ran before the settings were a value of their own, so a
        # call with several bad settings is told of the same one first)
        if not isinstance(self.check_chain, bool):
            raise ValueError(f"check_chain={self.check_chain!r} must be True or False")
        check_optimizer_factory(self.optimizer)  # an optimizer instance: the factory form
        check_lr_scheduler_factory(self.lr_scheduler)
        self._check_values()
        self._check_parallel()
        self._check_device()
        if self.micro_batch_size == "auto" and self.parallel not in (None, "none"):
            raise ValueError(f"micro_batch_size='auto' with parallel={self.parallel!r}: every "
                             "rank must split its batch alike; give micro_batch_size as an int")
        Precision.parse(self.precision)  # ValueError naming the choices
        parse_bytes(self.device_memory, "device_memory")
        parse_bytes(self.host_memory, "host_memory")

    def _check_values(self) -> None:
        """The settings that are wrong by themselves."""
        mbs = self.micro_batch_size
        if mbs != "auto" and (isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1):
            raise ValueError(f"micro_batch_size={mbs!r} must be a positive int or 'auto'")
        if self.schedule not in GENERATORS:
            raise ValueError(f"schedule={self.schedule!r} is unknown; "
                             f"choose one of {sorted(GENERATORS)}")
        clip = self.clip_grad_norm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not clip > 0):
            raise ValueError(f"clip_grad_norm={clip!r} must be a positive number or None")
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={self.nonfinite!r} must be 'raise' or 'skip'")
        if self.prefetch is not None and (not isinstance(self.prefetch, int) or self.prefetch < 0):
            raise ValueError(f"prefetch={self.prefetch!r} must be None or an int >= 0")
        parse_update_chunk(self.update_chunk)  # ValueError naming the fix
        if not isinstance(self.overlap_updates, bool):
            raise ValueError(f"overlap_updates={self.overlap_updates!r} must be True or False")

    def _check_parallel(self) -> None:
        """The settings that go with (or not with) a kind of parallelism."""
        parallel = self.parallel
        if self.overlap_updates and (self.shard_optimizer or parallel == "pipeline"):
            raise ValueError("overlap_updates=True is not available with shard_optimizer=True "
                             "(each owner broadcasts a pack's weights right after its update) "
                             "nor with parallel='pipeline'; drop overlap_updates")
        if parallel not in (None, "none", "data", "pipeline"):
            raise ValueError(f"parallel={parallel!r} is unknown; use None (one process), 'data' "
                             "or 'pipeline' (several processes under torchrun)")
        if parallel != "pipeline" and self.stages is not None:
            raise ValueError(f"stages={self.stages!r} needs parallel='pipeline'")
        if not isinstance(self.shard_optimizer, bool):
            raise ValueError(f"shard_optimizer={self.shard_optimizer!r} must be True or False")
        if self.shard_optimizer and parallel != "data":
            raise ValueError(f"shard_optimizer=True shards the optimizer state over data-parallel "
                             f"ranks, but parallel={parallel!r}; pass parallel='data' (under "
                             "torchrun) or drop shard_optimizer")
        # Micro-batches per forward; ValueError naming the fix.
        forward_group_of(self.forward_micro_batch_size, self.micro_batch_size, self.schedule,
                         parallel)
        if parallel == "pipeline":
            if isinstance(self.update_chunk_budget, int):
                raise ValueError(f"update_chunk={self.update_chunk!r} with parallel='pipeline': "
                                 "a pipeline stage updates whole packs; drop update_chunk")
            if self.schedule != "harmony" or self.clip_grad_norm is not None:
                raise ValueError(f"parallel='pipeline' runs schedule='harmony' without "
                                 f"clip_grad_norm (got schedule={self.schedule!r}, "
                                 f"clip_grad_norm={self.clip_grad_norm!r}); drop those arguments")

    def _check_device(self) -> None:
        device = torch.device(self.device)  # RuntimeError from torch for a name it lacks
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available; use "
                             "device='cpu'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: harmony runs on 'cpu' or 'cuda'")

    # -- the settings in the forms the trainer uses -----------------------------------------
    @property
    def device_memory_bytes(self) -> int | None:
        """``device_memory`` in bytes (None: no limit)."""
        return parse_bytes(self.device_memory, "device_memory")

    @property
    def host_memory_bytes(self) -> int | None:
        """``host_memory`` in bytes (None: no limit)."""
        return parse_bytes(self.host_memory, "host_memory")

    @property
    def update_chunk_budget(self) -> int | str | None:
        """``update_chunk`` in bytes, or ``"auto"`` or None as given."""
        return parse_update_chunk(self.update_chunk)

    @property
    def forward_group(self) -> int | None:
        """Micro-batches per forward: 1 without forward groups, None for the planner to
        choose (``forward_micro_batch_size="auto"``)."""
        return forward_group_of(self.forward_micro_batch_size, self.micro_batch_size,
                                self.schedule, self.parallel)

    @property
    def optimizer_factory(self) -> OptimizerFactory:
        """The optimizer factory given, or :func:`default_optimizer`."""
        return self.optimizer or default_optimizer

    @classmethod
    def names(cls) -> frozenset[str]:
        """The settings' names (the keyword arguments ``Trainer`` takes besides ``config``)."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, config: TrainerConfig | None, settings: dict[str, Any]) -> TrainerConfig:
        """A trainer's config: ``config``, or one made of the keyword ``settings``.

        Raises:
            TypeError: a keyword that is no setting, settings beside ``config``, or a
                ``config`` that is not a TrainerConfig.
            ValueError: a bad setting.
        """
        if config is None:
            unknown = sorted(set(settings) - cls.names())
            if unknown:
                raise TypeError(f"Trainer() got unexpected keyword argument(s) {unknown}; its "
                                f"settings are {sorted(cls.names())}")
            return cls(**settings)
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config={config!r} is not a harmony.TrainerConfig; pass "
                            "TrainerConfig(...), or the settings as keyword arguments")
        if settings:
            raise TypeError(f"Trainer(config=...) takes every setting from config, but "
                            f"{sorted(settings)} were given beside it; pass them in "
                            "TrainerConfig(...) (dataclasses.replace(config, ...) changes some)")
        return config
