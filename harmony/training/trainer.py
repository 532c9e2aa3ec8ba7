"""The public entry point: :class:`Trainer`.

The trainer checks its arguments, sets up the tiers and runs the steps; how it plans is in
:mod:`harmony.training.trainer_planning`, how it reads back, saves and loads its state in
:mod:`harmony.training.trainer_state` (its base classes).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmony.model.chain import Chain
from harmony.model.inplace import InputCopies
from harmony.model.layout import Layout
from harmony.model.materialize import Materializer, Scratch
from harmony.model.precision import GradientOverflow, Precision
from harmony.model.probe import check_chain
from harmony.model.tied import Tie, retie, shared_parameters
from harmony.parallel.data_parallel import DataParallel
from harmony.parallel.dist import bind_device
from harmony.parallel.pipeline import Pipeline
from harmony.planning.chunks import parse_update_chunk
from harmony.planning.device_memory import ReservedPeak, check_fits
from harmony.planning.groups import forward_group_of
from harmony.planning.microbatch import split_batch
from harmony.planning.planner import InfeasiblePlan, Plan
from harmony.planning.profile import optimizer_state_ratio
from harmony.planning.refusals import refuse_before_training
from harmony.planning.sizes import parse_bytes
from harmony.runtime.host_memory import bound_malloc
from harmony.runtime.runtime import NonFiniteLoss, Runtime, StepData
from harmony.training.ownership import Hold, acts, check_free
from harmony.training.trainer_planning import TrainerPlanning, _load_plan
from harmony.training.user_checks import (
    check_lr_scheduler_factory,
    check_optimizer_factory,
    checked_optimizer_factory,
)
from schedules.generators import GENERATORS
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.nvme import NvmeStore, check_root
from swap.stats import Stats
from swap.streams import host_pinning
from swap.tier import Tier, fmt_bytes

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _writable(path: Path) -> Path:
    """A new empty file next to ``path`` that will replace it (so ``path`` can be written).

    Raises:
        OSError: of the kind the file system gave, naming ``path`` and saying the step was
            not run.
    """
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(name)
    except OSError as err:
        raise type(err)(err.errno, f"record_step(path={str(path)!r}): cannot write there "
                                   f"({err.strerror}); give a writable file path. The step "
                                   "was not run") from err


def _dropped(hold: Hold, built: list[bool], copies: InputCopies) -> None:
    """A trainer was garbage-collected (or the interpreter ends) without close()."""
    copies.remove()
    if not built[0]:
        hold.release()
    elif not hold.kept:
        hold.keep("its harmony.Trainer was deleted without close(), and the trained weights "
                  "went with it; close() a trainer (or use `with harmony.Trainer(...)`) to "
                  "get the model back, or save() first")


def _probe_k_ratio(factory: OptimizerFactory) -> float:
    """Optimizer-state bytes per parameter byte
    (:func:`harmony.planning.profile.optimizer_state_ratio`);
    2.0, Adam's, for an optimizer that cannot be probed on a stand-in parameter."""
    try:
        return optimizer_state_ratio(factory)
    except Exception:
        return 2.0


class Trainer(TrainerPlanning):
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
        optimizer: a factory ``params -> torch.optim.Optimizer``; one optimizer is built per pack
            over that pack's parameters, and it must hold exactly those (per-parameter
            optimizers such as SGD and AdamW give the same update as one optimizer over the
            whole model). Default: AdamW(lr=1e-3). An optimizer instance is refused.
        micro_batch_size: samples per micro-batch; a batch is split with ``torch.split`` (the
            last micro-batch may be smaller) and each micro-batch's loss is weighted by its share
            of the samples, so a step equals one full-batch step. ``"auto"``: the largest size
            (the batch, or a power of two below it) for which the planner finds a plan within
            the budgets, chosen per batch shape (:attr:`micro_batch_size_used` tells which).
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
            fp32, and
            fp32 master weights live with the optimizer state; :meth:`state_dict` gives the
            masters. fp16 skips (and counts in ``stats.skipped_steps``) steps whose gradients
            overflow; its current loss scale is ``trainer.precision.scale`` (the trainer keeps
            its own copy of a given Precision). See :mod:`harmony.model.precision`.
        parallel: None (or ``"none"``): one process. ``"data"``: data parallelism over the
            ranks of the default ``torch.distributed`` group (initialized from torchrun's
            environment when there is none; NCCL on CUDA, gloo on CPU). As with DDP, each rank
            passes its own share of the batch to :meth:`step`, and a step equals one process's
            step on all ranks' samples together (each sample's loss weighs 1 / global
            samples); ``device="cuda"`` means GPU ``LOCAL_RANK``; rank 0 writes checkpoints.
            See :mod:`harmony.parallel.data_parallel` (and ``shard_optimizer``).
            ``"pipeline"``: run under ``torchrun`` with one process per stage; the packs
            are split into contiguous stages, one per rank, and activations pass between
            neighbouring ranks (see :mod:`harmony.parallel.pipeline`). Every rank calls :meth:`step`
            with the same global batch (only the first stage reads the inputs, only the last
            the targets) and gets the batch loss back; :meth:`state_dict` and :meth:`save`
            are then collective (every rank calls them).
        stages: with ``parallel="pipeline"``, the ``[start, stop)`` layers of each rank's
            stage, e.g. ``[(0, 6), (6, 12)]``; None balances packs by profiled compute time.
        shard_optimizer: with ``parallel="data"``, give each pack one owner rank (balanced by
            optimizer-state bytes): its gradients are reduced onto the owner, only the owner
            holds and steps its optimizer state (and is charged for it: host memory for K
            falls to about 1/N per rank), and it broadcasts the updated weights to the other
            ranks before the step ends. Global-norm clipping sums the owners' squared norms
            over the ranks (fp16's overflow check agrees likewise); :meth:`save` gathers the
            whole optimizer state into the checkpoint (loadable sharded or not). In mixed
            precision only the owner keeps a pack's fp32 masters, so :meth:`state_dict` is
            collective then. Not with tied weights yet. Default False (every rank holds every
            pack's state).
        check_chain: before the first step, check on a slice of the first micro-batch that the
            chain harmony split the model into by itself (an ``nn.Sequential``, a Hugging
            Face model) computes the model's output and gradients (:mod:`harmony.model.probe`);
            a chain that does not is refused with :class:`harmony.model.probe.ChainMismatch`.
            False skips the check. Chains declared by ``harmony_chain()`` are not checked.

        init: for a model on the meta device, ``layer -> None`` initializing one layer's
            parameters (and meta buffers) in place, run under torch's generator seeded from
            ``(seed, layer index)``; default :func:`harmony.model.materialize.default_init` (each
            module's ``reset_parameters()``, or a Hugging Face model's ``_init_weights``).
            What it leaves unset is refused by name.
        weights: a safetensors file, a directory with ``model.safetensors`` or shards and
            ``model.safetensors.index.json`` (Hugging Face's layout), or a harmony
            checkpoint directory: every tensor it holds is read from it, one tensor at a time,
            into its pack's home (:mod:`harmony.io.weights`; never unpickled). For a model on
            the meta device or built normally.

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
                 loss_fn: Callable[..., torch.Tensor],
                 optimizer: OptimizerFactory | None = None, micro_batch_size: int | str = 1,
                 device: str | torch.device = "cpu",
                 device_memory: int | str | None = None, host_memory: int | str | None = None,
                 nvme_dir: str | None = None, schedule: str = "harmony",
                 prefetch: int | None = None, seed: int = 0, nonfinite: str = "raise",
                 nvme_backend: str = "auto",
                 plan: Plan | str | os.PathLike[str] | None = None,
                 clip_grad_norm: float | None = None,
                 lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                 precision: str | Precision = "fp32",
                 parallel: str | None = None,
                 stages: Sequence[tuple[int, int]] | None = None,
                 shard_optimizer: bool = False,
                 forward_micro_batch_size: int | str | None = None,
                 update_chunk: int | str | None = "auto",
                 overlap_updates: bool = False, check_chain: bool = True,
                 init: Callable[[nn.Module], None] | None = None,
                 weights: str | os.PathLike[str] | None = None) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn={loss_fn!r} is not callable; pass (output, target) -> loss")
        if not isinstance(check_chain, bool):
            raise ValueError(f"check_chain={check_chain!r} must be True or False")
        self._check_chain = check_chain  # (the probe runs before the first step)
        check_optimizer_factory(optimizer)  # an optimizer instance: ValueError with the form
        check_lr_scheduler_factory(lr_scheduler)
        if micro_batch_size != "auto" and (isinstance(micro_batch_size, bool) or not isinstance(
                micro_batch_size, int) or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive int or "
                             "'auto'")
        if schedule not in GENERATORS:
            raise ValueError(f"schedule={schedule!r} is unknown; "
                             f"choose one of {sorted(GENERATORS)}")
        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(
                clip_grad_norm, (int, float)) or not clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm={clip_grad_norm!r} must be a positive number or "
                             "None")
        self.clip_grad_norm = clip_grad_norm
        self.lr_scheduler_factory = lr_scheduler
        self.lr_schedulers: list[Any] = []
        self._pending_scheduler: dict[str, Any] | None = None
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r} must be 'raise' or 'skip'")
        self.nonfinite = nonfinite
        if prefetch is not None and (not isinstance(prefetch, int) or prefetch < 0):
            raise ValueError(f"prefetch={prefetch!r} must be None or an int >= 0")
        self.update_chunk = parse_update_chunk(update_chunk)  # ValueError naming the fix
        if not isinstance(overlap_updates, bool):
            raise ValueError(f"overlap_updates={overlap_updates!r} must be True or False")
        if overlap_updates and (shard_optimizer or parallel == "pipeline"):
            raise ValueError("overlap_updates=True is not available with shard_optimizer=True "
                             "(each owner broadcasts a pack's weights right after its update) "
                             "nor with parallel='pipeline'; drop overlap_updates")
        self.overlap_updates = overlap_updates
        # Pipeline parallelism: this rank's stage, its plan and its sends
        # (harmony.parallel.pipeline).
        self._pipeline: Pipeline | None = None
        if parallel not in (None, "none", "data", "pipeline"):
            raise ValueError(f"parallel={parallel!r} is unknown; use None (one process), 'data' "
                             "or 'pipeline' (several processes under torchrun)")
        if parallel != "pipeline" and stages is not None:
            raise ValueError(f"stages={stages!r} needs parallel='pipeline'")
        if not isinstance(shard_optimizer, bool):
            raise ValueError(f"shard_optimizer={shard_optimizer!r} must be True or False")
        if shard_optimizer and parallel != "data":
            raise ValueError(f"shard_optimizer=True shards the optimizer state over data-parallel "
                             f"ranks, but parallel={parallel!r}; pass parallel='data' (under "
                             "torchrun) or drop shard_optimizer")
        self.shard_optimizer = shard_optimizer
        # Micro-batches per forward (None: the planner chooses); ValueError naming the fix.
        self._forward_group = forward_group_of(forward_micro_batch_size, micro_batch_size,
                                               schedule, parallel)
        self.forward_micro_batch_size = forward_micro_batch_size
        self._second_input: tuple[torch.Tensor, ...] | None = None  # (grouping is profiled)
        if parallel == "pipeline":
            if isinstance(self.update_chunk, int):
                raise ValueError(f"update_chunk={update_chunk!r} with parallel='pipeline': a "
                                 "pipeline stage updates whole packs; drop update_chunk")
            if schedule != "harmony" or clip_grad_norm is not None:
                raise ValueError(f"parallel='pipeline' runs schedule='harmony' without "
                                 f"clip_grad_norm (got schedule={schedule!r}, clip_grad_norm="
                                 f"{clip_grad_norm!r}); drop those arguments")
            self._pipeline = Pipeline(device, stages)
            device = self._pipeline.device  # "cuda" means this rank's GPU (LOCAL_RANK)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r}: harmony runs on 'cpu' or 'cuda'")
        # Data parallelism (harmony/parallel/data_parallel.py); None for one process.
        self._dp = DataParallel.create(parallel, self.device, shard_optimizer)
        if micro_batch_size == "auto" and parallel not in (None, "none"):
            raise ValueError(f"micro_batch_size='auto' with parallel={parallel!r}: every rank "
                             "must split its batch alike; give micro_batch_size as an int")
        self._auto_sizes: dict[tuple[Any, ...], int] = {}  # batch shape -> chosen size
        self._auto_plan: Plan | None = None  # the first step's, found choosing the size
        self._changing: set[int] = set()  # buffers a forward changes (found by the profile)
        self.micro_batch_size_used: int | None = None
        if self._dp is not None:
            self.device = self._dp.device  # "cuda" -> this rank's GPU
        if self.device.type == "cuda":  # its streams, events and generators are this GPU's
            self.device = bind_device(self.device)
        self.precision = Precision.parse(precision)  # ValueError naming the choices
        self.precision.check_device(self.device)
        # Freed buffers go back to the kernel, so the process stays within its budgets.
        bound_malloc()
        self.device_memory = parse_bytes(device_memory, "device_memory")
        if self.device.type == "cuda":  # the budget must fit beside the context and workspaces
            check_fits(self.device_memory, torch.cuda.mem_get_info(self.device)[0], self.device)
        self.host_memory = parse_bytes(host_memory, "host_memory")
        self.chain = Chain(model)
        check_free(self.chain.model, self.chain.layers)  # another trainer's: ValueError
        # Where the values of a model built on the meta device come from, layer by layer
        # (or of any model, from weights=); ValueError/WeightsError naming the fix.
        self._materializer = Materializer(self.chain, init=init, weights=weights, seed=seed)
        self._fixed: tuple[Any, ...] | None = None
        if plan is not None:
            given = plan if isinstance(plan, Plan) else _load_plan(plan)
            if given.bounds[-1][1] != len(self.chain):
                raise ValueError(f"plan={plan!r} covers {given.bounds[-1][1]} layers but the "
                                 f"model's chain has {len(self.chain)}; make the plan for this "
                                 "model (harmony report ... --json)")
            self._fixed = (given.bounds, given.placement)
            schedule, prefetch = given.schedule.name, given.schedule.prefetch
            if forward_micro_batch_size is not None and self._forward_group != \
                    given.forward_group:
                raise ValueError(f"forward_micro_batch_size={forward_micro_batch_size!r} but "
                                 f"plan={plan!r} runs forwards over {given.forward_group} "
                                 "micro-batch(es); drop one of the two")
            self._forward_group = given.forward_group
            if self.update_chunk == "auto":  # the plan's chunks too
                self.update_chunk = given.update_chunk
        self.loss_fn = loss_fn
        self.optimizer_factory = checked_optimizer_factory(optimizer or _default_optimizer)
        self.micro_batch_size = micro_batch_size
        self.schedule_name = schedule
        self.prefetch = prefetch
        self.seed = seed
        self.step_count = 0
        self.stats = Stats()
        self._layer_layouts = [Layout([m], self.precision.dtype_of) for m in self.chain.layers]
        # Where each of the model's tensors came from: close() gives the trained values back
        # there (a tensor on the meta device comes back on the CPU).
        self._origin = {id(e.tensor): (torch.device("cpu") if e.tensor.is_meta
                                       else e.tensor.device,
                                       e.shape.numel() * e.master_dtype.itemsize)
                        for layout in self._layer_layouts for e in layout.entries}
        self._check_shared_parameters()
        if self._tied and shard_optimizer:
            raise ValueError("shard_optimizer=True with tied weights (a parameter used by several "
                             "layers) is not supported: their gradients are summed across packs "
                             "that different ranks would own; untie them or shard_optimizer=False")
        if self._tied and self._pipeline is not None:
            raise ValueError("parallel='pipeline' with tied weights (a parameter used by several "
                             "layers, e.g. an embedding and an LM head) is not supported: the "
                             "stages would each hold a copy; untie them or use parallel=None")
        # The model's parameters with each tied one once, as clip_grad_norm_ sees them; kept
        # before the packs are built, since untie() gives sharing packs copies of their own.
        self._params = list(self.chain.model.parameters())
        self._ties: list[Tie] = []
        # A tensor under several keys names its optimizer state by its first key, whichever
        # packs the plan makes (so checkpoints load across plans).
        keys: dict[int, list[str]] = {}
        for k, v in self._model_tensors().items():
            keys.setdefault(id(v), []).append(k)
        self._first_key = {i: ks[0] for i, ks in keys.items() if len(ks) > 1}
        self._check_layers_fit()
        self._k_ratio = _probe_k_ratio(self.optimizer_factory)
        if nvme_dir is not None:  # (a bad value is named before any budget arithmetic)
            check_root(nvme_dir)
        if self._pipeline is None:  # (a stage holds part of the model: its plan checks it)
            # What no plan can fix, with the numbers, before anything is profiled; with a
            # sharded optimizer each rank holds only its packs' optimizer state.
            refuse_before_training(
                self.chain.model, self._layer_layouts,
                0.0 if shard_optimizer else self.precision.k_ratio(self._k_ratio),
                self.device, self.device_memory, self.host_memory, nvme_dir,
                built=not self._materializer.meta)
        self.store = (NvmeStore(nvme_dir, backend=nvme_backend)  # ValueError if unusable
                      if nvme_dir is not None else None)
        # CPU buffers that files are read into or written from come page-aligned from the
        # store, so its direct I/O needs no staging copy (pinned CUDA buffers are page-aligned
        # too: swap.pinned).
        pin = host_pinning(self.device)
        aligned = self.store.allocate if self.store is not None else None
        self.tiers = {
            # On CPU the device tier stands in for a GPU whose caching allocator keeps freed
            # blocks: its pool keeps freed buffers for reuse; but they are host memory, so
            # they share the budget (used + cached <= device_memory).
            Loc.DEVICE: Tier("device", self.device, self.device_memory,
                             cache_limit=None if self.device.type == "cpu" else 0,
                             share_capacity=self.device.type == "cpu",
                             alloc=aligned if self.device.type == "cpu" else None),
            Loc.HOST: Tier("host", torch.device("cpu"), self.host_memory, pin=pin,
                           share_capacity=True, alloc=None if pin else aligned),
        }
        if self.store is not None:
            self.tiers[Loc.NVME] = Tier("nvme", torch.device("cpu"), None)
        # Layers being materialized live in host memory, counted in the host budget (on
        # CPU, in the device budget when the host's is full: that is host memory too).
        self._materializer.memory(Scratch([self.tiers[Loc.HOST]] + (
            [self.tiers[Loc.DEVICE]] if self.device.type == "cpu" else [])))
        self._engine = SwapEngine(self.device, self.stats, self.tiers[Loc.DEVICE])
        self._reserved = ReservedPeak(self.device)  # started once the first plan is made
        self._runtime: Runtime | None = None
        self._plan: Plan | None = None
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._profiles: list[Any] | None = None
        self._pending_optimizer: tuple[dict[str, torch.Tensor], dict[str, Any], list[Any]] | None \
            = None
        self._gathered_scheduler: dict[str, Any] | None = None
        self._closed = False
        self._broken: str | None = None  # why stepping on would train on inconsistent weights
        self._probed_optimizer: str | None = None  # the optimizer's class, once probed
        self._recording: list[dict[str, object]] | None = None  # record_step's, if any
        self._planning_seconds = 0.0  # the first step's profile, plan and build
        # The model is the trainer's until close(): touching it meanwhile raises, saying so.
        # A trainer dropped without close() lets go of a model it never took the weights of.
        self._hold = Hold(self.chain.model, self.chain.layers)
        self._built = [False]  # whether packs hold the weights (for the finalizer below)
        # Layers that change their input in place get private copies (harmony/model/inplace.py).
        self._input_copies = InputCopies()
        self._on_drop = weakref.finalize(self, _dropped, self._hold, self._built,
                                         self._input_copies)

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

        return cls(load_meta(path, model_class), loss_fn, weights=path, **kwargs)

    # -- checks -----------------------------------------------------------------------------
    def _check_shared_parameters(self) -> None:
        # Parameters shared across layers are tied weights (harmony/model/tied.py); buffers are
        # refused. The planner gets, per tied weight, the layers using it and its gradient's bytes.
        shared = shared_parameters(self._layer_layouts, self.chain.names)
        self._tied: list[tuple[tuple[int, ...], int]] = []
        for tid, layers in shared.items():
            e = next(e for e in self._layer_layouts[layers[0]].entries if id(e.tensor) == tid)
            if e.trainable:
                self._tied.append((tuple(layers), e.shape.numel() * e.master_dtype.itemsize))

    def _check_layers_fit(self) -> None:
        if self.device_memory is None:
            return
        for i, layout in enumerate(self._layer_layouts):
            need = layout.w_bytes + layout.g_bytes
            if need > self.device_memory:
                raise ValueError(
                    f"device_memory={fmt_bytes(self.device_memory)} is smaller than layer {i} "
                    f"({self.chain.names[i]!r}), whose weights and gradients alone need "
                    f"{fmt_bytes(need)}; use device_memory>={fmt_bytes(need)} plus room for "
                    "activations, or split that layer")

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
        try:
            if self._dp is None:
                return self._step(inputs, targets)
            # A failure on this rank tears the process group down, so no other rank hangs.
            # (A non-finite loss or an infeasible plan is raised by every rank alike.)
            with self._dp.failing_together(passes=(NonFiniteLoss, InfeasiblePlan)):
                return self._step(inputs, targets)
        finally:
            self._built[0] = self._runtime is not None

    def _step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
              targets: torch.Tensor) -> float:
        if self._closed:
            raise RuntimeError("this Trainer is closed")
        if self._broken is not None:
            raise RuntimeError(self._broken)
        self.chain.note_input(inputs)  # (an nn.Sequential passes a tuple input as one argument)
        t0 = time.perf_counter()
        mbs = self.micro_batch_size if isinstance(self.micro_batch_size, int) \
            else self._auto_micro_batch_size(inputs, targets)
        micro_inputs, micro_targets, weights, single = split_batch(inputs, targets, mbs)
        self.micro_batch_size_used = mbs
        for name, t in [("inputs", x) for x in micro_inputs[0]] + [("targets", micro_targets[0])]:
            if t.device.type != "cpu" and t.device != self.device:
                raise ValueError(f"{name} are on {t.device}, but this trainer computes on "
                                 f"{self.device}; pass CPU tensors (harmony moves each "
                                 f"micro-batch) or tensors on {self.device}")
        if self._check_chain:  # does the chain compute what the model computes? (once)
            check_chain(self.chain, micro_inputs[0], single)
            self._check_chain = False
        sizes = [x[0].shape[0] for x in micro_inputs]
        key = (tuple(sizes),) + tuple(
            (tuple(t.shape[1:]), t.dtype) for t in micro_inputs[0])
        # A profile checks each layer for forward groups on the first two micro-batches.
        self._second_input = micro_inputs[1] if len(micro_inputs) > 1 else None
        if self._runtime is None:  # (micro_batch_size='auto' planned this batch already)
            t_plan = time.perf_counter()
            self._first_plan(micro_inputs[0], micro_targets[0], sizes, key, self._auto_plan)
            self._auto_plan = None
            self._planning_seconds = time.perf_counter() - t_plan
        plan_ = self._plans.get(key)
        if plan_ is None:
            plan_ = self._replan(micro_inputs[0], micro_targets[0], sizes, key)
        self._plan = plan_
        assert self._runtime is not None
        mb_offset = 0
        if self._dp is not None:  # global loss weights and micro-batch numbers
            weights, mb_offset = self._dp.loss_weights(sizes)
        data = StepData(micro_inputs, micro_targets, weights, single)
        if self._pipeline is not None:  # later stages receive their inputs
            data = self._pipeline.step_data(data)
        step = self.step_count
        try:
            loss = self._runtime.run(plan_.schedule, plan_.sizes, data, self.step_count,
                                     self.stats.seconds, mb_offset=mb_offset,
                                     record=self._recording)
            if self._pipeline is not None:
                self._pipeline.finish()
            # The step's bookkeeping belongs to it: an interrupt here (every pack updated, the
            # count or the schedulers not) leaves the trainer as inconsistent as one between
            # two packs' updates.
            self.precision.update_scale(overflow=False)
            self.step_count += 1
            for scheduler in self.lr_schedulers:
                scheduler.step()
        except GradientOverflow:  # fp16: nothing was updated; retry later at a lower scale
            self.precision.update_scale(overflow=True)
            self.stats.skipped_steps += 1
            return float(self._runtime.loss)
        except NonFiniteLoss as err:
            if self.nonfinite == "skip":
                self.stats.skipped_steps += 1
                return err.loss
            raise
        except BaseException as err:
            if self._runtime.updated:  # some packs took the step, others did not
                self._broken = (
                    f"step {step} failed ({type(err).__name__}: {err}) after updating packs "
                    f"{self._runtime.updated}; the weights are no longer those of one "
                    "consistent step: load() a checkpoint before training on")
            raise
        for loc, tier in self.tiers.items():
            self.stats.peak_bytes[loc.value] = max(self.stats.peak_bytes.get(loc.value, 0),
                                                   tier.peak)
        self._engine.settle()  # busy and stall times whose events were reached (CUDA)
        if self.device.type == "cuda":  # what the caching allocator reserved, beside "device"
            self.stats.peak_bytes["device reserved"] = self._reserved.peak
            if self.tiers[Loc.HOST].pinned is not None:
                self.stats.peak_bytes["host pinned"] = self.tiers[Loc.HOST].pinned or 0
        self.stats.seconds["step"] += time.perf_counter() - t0
        return loss

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
        from harmony.tools.report import plan_to_json

        out = Path(path)
        tmp = _writable(out)  # before the step: a path it cannot write refuses the step
        try:
            before = (dict(self.stats.bytes_moved), dict(self.stats.busy_seconds),
                      dict(self.stats.stall_seconds))
            for tier in self.tiers.values():
                tier.reset_peak()
            record: list[dict[str, object]] = []
            first = self._runtime is None
            self._recording = record  # (the step passes it to the runtime)
            self._planning_seconds = 0.0
            t0 = time.perf_counter()
            try:
                loss = self.step(inputs, targets)
            finally:
                self._recording = None
            seconds = time.perf_counter() - t0 - self._planning_seconds
            assert self._plan is not None

            def delta(now: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
                return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0)}

            data = {
                "format": "harmony-step/1", "step": self.step_count - 1, "seconds": seconds,
                "first": first, "planning_seconds": self._planning_seconds,
                "loss": loss, "tasks": record,
                "bytes_moved": delta(self.stats.bytes_moved, before[0]),
                "busy_seconds": delta(self.stats.busy_seconds, before[1]),
                "stall_seconds": delta(self.stats.stall_seconds, before[2]),
                "peak_bytes": {loc.value: tier.peak for loc, tier in self.tiers.items()},
                "budgets": {"device": self.device_memory, "host": self.host_memory},
                "plan": plan_to_json(self._plan)}
            tmp.write_text(json.dumps(data))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return loss

    # -- results ----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The plan of the last step (None before the first step)."""
        return self._plan

    @acts
    def close(self) -> None:
        """Give the model back and free buffers, files and threads; idempotent.

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
        if self._closed:
            return
        with contextlib.suppress(Exception):  # (a broken group fails them at once)
            self._weights_arrived()
        why_not = self._why_not_given_back()
        self._closed = True
        self._engine.close()
        if self._runtime is not None:
            self._runtime.close()
            for pack in self._runtime.packs:
                if why_not is None:
                    try:
                        pack.give_back(self._origin_device)
                        continue
                    except Exception as err:  # (an NVMe read failed, say)
                        why_not = (f"giving the weights back failed ({type(err).__name__}: "
                                   f"{err}), so the model was not given back its weights; "
                                   "save() or export() before close()")
                pack.close()
        for tier in self.tiers.values():
            tier.clear_cache()
        if self.store is not None:
            self.store.close()
        retie(self._ties)  # the model's modules share their parameters again
        if self._dp is not None:
            self._dp.close()
        if self._pipeline is not None:
            self._pipeline.close()
        self._on_drop.detach()
        self._input_copies.remove()
        if why_not is None:
            self._hold.release()
        else:
            self._hold.keep(f"this model's harmony.Trainer was closed: {why_not}")
            warnings.warn(f"harmony.Trainer.close(): {why_not}", stacklevel=3)

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
            why_not = self._why_not_given_back()
            if why_not is not None:
                raise RuntimeError(f"release_model() refused: {why_not} (the trainer is still "
                                   "open)")
            self.close()
        if self._hold.kept:
            raise RuntimeError(self._hold.message)
        return self.chain.model

    def _origin_device(self, entry: Any) -> torch.device:
        return self._origin.get(id(entry.tensor), (torch.device("cpu"), 0))[0]

    def _why_not_given_back(self) -> str | None:
        """Why close() would not give the model its trained weights (None: it will)."""
        if self._runtime is None:  # never built: the model holds its own tensors still
            return None
        if self._broken is not None:
            return (f"{self._broken}. Such weights are not given back to the model; load "
                    "the last checkpoint into a new Trainer, or take them with "
                    "state_dict(inconsistent_ok=True) before close()")
        if self._pipeline is not None:
            return ("with parallel='pipeline' each rank holds only its stage's weights, so "
                    "they are not given back to the model; call trainer.state_dict() on every "
                    "rank, or save() / export(), before close()")
        if any(not p.owned and p.layout.mixed for p in self._runtime.packs):
            return ("with shard_optimizer=True in mixed precision another rank keeps some "
                    "packs' fp32 masters, so the weights are not given back to the model; call "
                    "trainer.state_dict() on every rank, or save() / export(), before close()")
        need: dict[str, int] = {}
        for device, nbytes in self._origin.values():
            kind = "host" if device.type in ("cpu", "meta") else "device"
            need[kind] = need.get(kind, 0) + nbytes
        for kind, budget in (("host", self.host_memory), ("device", self.device_memory)):
            if budget is not None and need.get(kind, 0) > budget:
                return (f"the trained weights ({fmt_bytes(need[kind])}) exceed "
                        f"{kind}_memory={fmt_bytes(budget)}, so they are not given back to "
                        "the model; call trainer.export(dir) (safetensors the model loads) "
                        "or trainer.save(dir) before close() and load them from there")
        return None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
