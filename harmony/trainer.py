"""The public entry point: :class:`Trainer`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmony import checkpoint
from harmony.chain import Chain
from harmony.chunks import parse_update_chunk
from harmony.data_parallel import DataParallel
from harmony.groups import forward_group_of, refuse_ungroupable
from harmony.layout import Layout
from harmony.microbatch import split_batch
from harmony.pack import Pack
from harmony.pipeline import Pipeline
from harmony.planning import InfeasiblePlan, Plan, largest_micro_batch, plan
from harmony.precision import GradientOverflow, Precision
from harmony.profile import UNCHECKED, optimizer_state_ratio, profile_layers
from harmony.runtime import NonFiniteLoss, Runtime, StepData
from harmony.sizes import parse_bytes
from harmony.tied import Tie, TiedWeights, retie, shared_parameters, untie
from harmony.update_worker import UpdateWorker
from schedules.generators import GENERATORS
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.nvme import NvmeStore
from swap.stats import Stats
from swap.streams import host_pinning
from swap.tier import Tier, fmt_bytes

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class Trainer:
    """Trains a chain of layers whose training state need not fit in device memory.

    Args:
        model: an ``nn.Sequential``, a list of modules, or a module with ``harmony_chain()``.
            Its parameters become harmony's: read them back with :meth:`state_dict`.
        loss_fn: ``(output, target) -> scalar`` mean loss of one micro-batch.
        optimizer: a factory ``params -> torch.optim.Optimizer``; one optimizer is built per pack
            over that pack's parameters (per-parameter optimizers such as SGD and AdamW give the
            same update as one optimizer over the whole model). Default: AdamW(lr=1e-3).
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
        device: the compute device, ``"cpu"`` or ``"cuda[:i]"``.
        device_memory, host_memory: budgets in bytes or strings such as ``"8GiB"``; None means
            no limit.
        nvme_dir: an existing, writable directory (ideally on an NVMe drive) for the NVMe tier;
            None: no NVMe tier. harmony works in a private subdirectory it removes on close.
        nvme_backend: ``"auto"`` (DeepSpeed's async I/O op when it is built, else O_DIRECT
            threads), ``"aio"``, ``"odirect"`` or ``"buffered"``.
        update_chunk: how the update of a pack homed on NVMe streams its weights, fp32 masters
            and optimizer state through host memory (:mod:`harmony.chunked_update`): in
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
            backward (:mod:`harmony.update_worker`); whatever next touches that pack waits
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
            with checkpoints).
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
            :class:`harmony.precision.Precision` (fp16's loss-scaling settings): weights compute
            and move in the low dtype under ``torch.autocast``, gradients accumulate in fp32, and
            fp32 master weights live with the optimizer state; :meth:`state_dict` gives the
            masters. fp16 skips (and counts in ``stats.skipped_steps``) steps whose gradients
            overflow; its current loss scale is ``trainer.precision.scale`` (the trainer keeps
            its own copy of a given Precision). See :mod:`harmony.precision`.
        parallel: None (or ``"none"``): one process. ``"data"``: data parallelism over the
            ranks of the default ``torch.distributed`` group (initialized from torchrun's
            environment when there is none; NCCL on CUDA, gloo on CPU). As with DDP, each rank
            passes its own share of the batch to :meth:`step`, and a step equals one process's
            step on all ranks' samples together (each sample's loss weighs 1 / global
            samples); ``device="cuda"`` means GPU ``LOCAL_RANK``; rank 0 writes checkpoints.
            See :mod:`harmony.data_parallel` (and ``shard_optimizer``).
            ``"pipeline"``: run under ``torchrun`` with one process per stage; the packs
            are split into contiguous stages, one per rank, and activations pass between
            neighbouring ranks (see :mod:`harmony.pipeline`). Every rank calls :meth:`step`
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

    Raises:
        ValueError: a bad argument or a budget that cannot hold the largest layer (or
            ``shard_optimizer=True`` without ``parallel="data"``); the message names the value
            and what to change.

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
                 overlap_updates: bool = False) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn={loss_fn!r} is not callable; pass (output, target) -> loss")
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
        # Pipeline parallelism: this rank's stage, its plan and its sends (harmony.pipeline).
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
        # Data parallelism (harmony/data_parallel.py); None for one process.
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
        self.precision = Precision.parse(precision)  # ValueError naming the choices
        self.precision.check_device(self.device)
        self.device_memory = parse_bytes(device_memory, "device_memory")
        self.host_memory = parse_bytes(host_memory, "host_memory")
        self.chain = Chain(model)
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
        self.optimizer_factory = optimizer or _default_optimizer
        self.micro_batch_size = micro_batch_size
        self.schedule_name = schedule
        self.prefetch = prefetch
        self.seed = seed
        self.step_count = 0
        self.stats = Stats()
        self._layer_layouts = [Layout([m], self.precision.dtype_of) for m in self.chain.layers]
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
        for k, v in self.chain.model.state_dict(keep_vars=True).items():
            keys.setdefault(id(v), []).append(k)
        self._first_key = {i: ks[0] for i, ks in keys.items() if len(ks) > 1}
        self._check_layers_fit()
        self.store = (NvmeStore(nvme_dir, backend=nvme_backend)  # ValueError if unusable
                      if nvme_dir is not None else None)
        # CPU buffers that files are read into or written from come page-aligned from the
        # store, so its direct I/O needs no staging copy (pinned CUDA buffers stay torch's).
        pin = host_pinning(self.device)
        aligned = self.store.allocate if self.store is not None else None
        self.tiers = {
            # On CPU the device tier stands in for a GPU whose caching allocator keeps freed
            # blocks: its pool keeps every freed buffer, so steady-state steps allocate nothing.
            Loc.DEVICE: Tier("device", self.device, self.device_memory,
                             cache_limit=None if self.device.type == "cpu" else 0,
                             alloc=aligned if self.device.type == "cpu" else None),
            Loc.HOST: Tier("host", torch.device("cpu"), self.host_memory, pin=pin,
                           share_capacity=True, alloc=None if pin else aligned),
        }
        if self.store is not None:
            self.tiers[Loc.NVME] = Tier("nvme", torch.device("cpu"), None)
        self._engine = SwapEngine(self.device, self.stats)
        self._runtime: Runtime | None = None
        self._plan: Plan | None = None
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._profiles: list[Any] | None = None
        self._k_ratio = 2.0
        self._pending_optimizer: tuple[dict[str, torch.Tensor], dict[str, Any], list[Any]] | None \
            = None
        self._gathered_scheduler: dict[str, Any] | None = None
        self._closed = False
        self._broken: str | None = None  # why stepping on would train on inconsistent weights

    # -- checks -----------------------------------------------------------------------------
    def _check_shared_parameters(self) -> None:
        # Parameters shared across layers are tied weights (harmony/tied.py); buffers are refused.
        # The planner gets, per tied weight, the layers using it and its gradient's bytes.
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
        if self._dp is None:
            return self._step(inputs, targets)
        # A failure on this rank tears the process group down, so no other rank hangs.
        # (A non-finite loss or an infeasible plan is raised by every rank alike.)
        with self._dp.failing_together(passes=(NonFiniteLoss, InfeasiblePlan)):
            return self._step(inputs, targets)

    def _step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
              targets: torch.Tensor) -> float:
        if self._closed:
            raise RuntimeError("this Trainer is closed")
        if self._broken is not None:
            raise RuntimeError(self._broken)
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
        sizes = [x[0].shape[0] for x in micro_inputs]
        key = (tuple(sizes),) + tuple(
            (tuple(t.shape[1:]), t.dtype) for t in micro_inputs[0])
        # A profile checks each layer for forward groups on the first two micro-batches.
        self._second_input = micro_inputs[1] if len(micro_inputs) > 1 else None
        if self._runtime is None:  # (micro_batch_size='auto' planned this batch already)
            self._first_plan(micro_inputs[0], micro_targets[0], sizes, key, self._auto_plan)
            self._auto_plan = None
        plan_ = self._plans.get(key)
        if plan_ is None:
            plan_ = self._replan(micro_inputs[0], micro_targets[0], sizes, key)
        self._plan = plan_
        assert self._runtime is not None
        if self._dp is not None:  # global loss weights and micro-batch numbers; all-reduces
            weights, self._runtime.mb_offset = self._dp.loss_weights(sizes)
            self._runtime.dp = self._dp
        data = StepData(micro_inputs, micro_targets, weights, single)
        if self._pipeline is not None:  # later stages receive their inputs
            data = self._pipeline.step_data(data)
        try:
            loss = self._runtime.run(plan_.schedule, plan_.sizes, data, self.step_count,
                                     self.stats.seconds)
            if self._pipeline is not None:
                self._pipeline.finish()
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
                    f"step {self.step_count} failed ({type(err).__name__}: {err}) after "
                    f"updating packs {self._runtime.updated}; the weights are no longer those "
                    "of one consistent step: load() a checkpoint before training on")
            raise
        self.precision.update_scale(overflow=False)
        self.step_count += 1
        for scheduler in self.lr_schedulers:
            scheduler.step()
        for loc, tier in self.tiers.items():
            self.stats.peak_bytes[loc.value] = max(self.stats.peak_bytes.get(loc.value, 0),
                                                   tier.peak)
        self.stats.seconds["step"] += time.perf_counter() - t0
        return loss

    def _profile(self, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        self._weights_arrived()
        # Between steps, the layers of packs homed off the device hold empty tensors: give
        # them their home weights while the profile runs (new input shapes re-profile).
        away = [] if self._runtime is None else [
            p for p in self._runtime.packs if p.home is not Loc.DEVICE]
        for pack in away:
            pack.layout.bind(pack.home_weights())
        grouping = self._forward_group != 1 and self._second_input is not None
        try:
            self._profiles = profile_layers(self.chain, self._layer_layouts, x, y,
                                            self.loss_fn, self.device, self.precision,
                                            changed=self._changing,
                                            group_inputs=self._second_input if grouping
                                            else None)
        finally:
            for pack in away:
                pack.layout.bind(None)
            for pack in self._runtime.packs if self._runtime is not None else []:
                pack.got_grad = [False] * len(pack.got_grad)  # the profile's backward set them
        try:
            self._k_ratio = optimizer_state_ratio(self.optimizer_factory)
        except Exception:  # an optimizer that cannot be probed: assume Adam-like state
            self._k_ratio = 2.0

    def _plan_for(self, sizes: list[int], fixed: Any = None,
                  forward_group: int | str | None = "asked",
                  update_chunk: int | str | None = "given") -> Plan:
        """A plan for micro-batches of ``sizes``; ``fixed``: keep these pack bounds and
        placement; ``forward_group``: micro-batches per forward (default: as asked);
        ``update_chunk``: the packs' chunk budget (default: the one this trainer was given)."""
        assert self._profiles is not None
        if self._pipeline is not None:  # this rank's stage (harmony.pipeline)
            return self._pipeline.plan(self, sizes)
        group = self._forward_group if forward_group == "asked" else forward_group
        assert group is None or isinstance(group, int)
        # Mixed precision: K holds the fp32 masters too, one more byte per (fp32) G byte; fp16
        # checks every gradient for overflow before any update, as clipping needs every one.
        k_ratio = self.precision.k_ratio(self._k_ratio)
        bandwidth, ranks, local_ranks = _bandwidth(self.device), 1, 1
        if self._dp is not None:  # all-reduce rate; ranks sharing this machine's links
            bandwidth, ranks, local_ranks = self._dp.planning(bandwidth)
        chosen = plan(self._profiles, self.schedule_name, sizes, self.device_memory,
                      self.host_memory, k_ratio, bandwidth,
                      prefetch=self.prefetch, fixed=fixed, nvme=self.store is not None,
                      deferred_updates=self.clip_grad_norm is not None
                      or self.precision.scaling,
                      tied=self._tied, ranks=ranks, local_ranks=local_ranks,
                      shard=self._dp.group.rank if self._dp is not None and self._dp.shard
                      else None, forward_group=group if len(sizes) > 1 else 1,
                      staging=self.device.type == "cuda",
                      update_chunk=self.update_chunk if update_chunk == "given"
                      else update_chunk, overlap_updates=self.overlap_updates)
        if isinstance(self.forward_micro_batch_size, int) and group and group > 1:
            refuse_ungroupable(self.forward_micro_batch_size, len(chosen.bounds),
                               chosen.ungrouped, self.chain.names)
        return chosen

    def _first_plan(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                    key: tuple[Any, ...], chosen: Plan | None = None) -> None:
        """Profile, plan (unless ``chosen`` is given) and build the packs and the runtime."""
        if chosen is None:
            self._profile(x, y)
            chosen = self._plan_for(sizes, fixed=self._fixed)
        if self._dp is not None:  # every rank runs rank 0's packs, so all-reduces pair up
            agreed = self._dp.agree(chosen.bounds, chosen.placement, chosen.forward_group,
                                    chosen.update_chunk)
            if agreed is not None:
                chosen = self._plan_for(sizes, fixed=agreed[:2], forward_group=agreed[2],
                                        update_chunk=agreed[3])
            self._forward_group = chosen.forward_group  # (later shapes keep rank 0's choice)
        placement = chosen.placement
        # Tied weights: packs after the first that uses one get a copy (harmony/tied.py).
        # (None with pipeline stages, whose bounds cover only this rank's layers)
        self._ties = untie(self.chain.model, self.chain.layers, chosen.bounds) \
            if self._tied else []
        if self._ties:
            self._layer_layouts = [Layout([m], self.precision.dtype_of)
                                   for m in self.chain.layers]
        packs = []
        rank = self._dp.group.rank if self._dp is not None else 0
        for p, (a, b) in enumerate(chosen.bounds):
            home = placement.w[p]
            # Sharded optimizer: another rank may own this pack's optimizer state and masters
            # (and their charge: the plan's K for it is 0 here); this rank receives its W.
            packs.append(Pack.build(p, a, self.chain.layers[a:b], home, self.tiers[home],
                                    self.optimizer_factory, chosen.sizes.k[p], self.store,
                                    self.precision,
                                    untrained=TiedWeights.untrained(self._ties, p),
                                    owned=chosen.owners is None or chosen.owners[p] == rank,
                                    update_chunk=chosen.update_chunk,
                                    k_ratio=self.precision.k_ratio(self._k_ratio)))
        self._runtime = Runtime(packs, self.tiers, self._engine, self.loss_fn, self.device,
                                self.seed, self.store)
        self._runtime.precision = self.precision
        if self.overlap_updates and chosen.overlap_updates:
            self._runtime.worker = UpdateWorker(self.stats)
        self._runtime.changing = self._changing  # (grows if later shapes are profiled)
        self._runtime.owners = chosen.owners
        if self._ties:
            self._runtime.ties = TiedWeights(self._ties, packs)
        if self._pipeline is not None:  # SEND/RECV with the neighbouring ranks
            self._pipeline.attach(self._runtime)
        if self.clip_grad_norm is not None:
            # The norm is taken over the gradients in the model's parameter order, as
            # clip_grad_norm_(model.parameters()) does, so the sum is rounded the same way.
            where = {id(e.tensor): (p, i) for p, pack in enumerate(packs)
                     for i, e in enumerate(pack.layout.trainable)}
            self._runtime.clip = (self.clip_grad_norm, [
                where[id(q)] for q in self._params if id(q) in where])
        self._plans[key] = chosen
        if self.lr_scheduler_factory is not None:
            # Built before a loaded state is applied: building one sets the learning rate to
            # the schedule's start, which the loaded optimizer settings must then override.
            self.lr_schedulers = [self.lr_scheduler_factory(p.optimizer) for p in packs]
        self._apply_optimizer_state()
        self._apply_scheduler_state()

    def _replan(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                key: tuple[Any, ...]) -> Plan:
        assert self._plan is not None
        shapes = key[1:]
        unchecked = self._forward_group != 1 and self._second_input is not None and \
            self._profiles is not None and any(lp.no_group == UNCHECKED for lp in self._profiles)
        if shapes != next(iter(self._plans))[1:] or unchecked:
            # new per-sample shapes: sizes per sample changed (or a first batch of one
            # micro-batch left forward groups unchecked)
            self._profile(x, y)
        fixed = (self._plan.bounds, self._plan.placement)
        try:  # (the packs' files are split into the chunks they were built with)
            chosen = self._plan_for(sizes, fixed=fixed, update_chunk=self._plan.update_chunk)
        except InfeasiblePlan:
            if self._pipeline is not None:  # (the stages are agreed between ranks once)
                raise
            # These shapes need more room than the packs built for the first ones leave
            # (say, longer sequences after packs were kept resident): plan afresh and move
            # the training state to the new packs' homes.
            return self._rehome(x, y, sizes, key)
        self._plans[key] = chosen
        return chosen

    def _rehome(self, x: tuple[torch.Tensor, ...], y: torch.Tensor, sizes: list[int],
                key: tuple[Any, ...]) -> Plan:
        """Rebuild the packs from a fresh plan for these shapes, keeping weights, optimizer
        and scheduler state (the same keyed hand-over as save/load, in memory)."""
        assert self._runtime is not None
        weights = self.state_dict()
        optimizer_state = self._full_optimizer_state() if self._dp is not None \
            and self._dp.shard else self._optimizer_state()
        scheduler_state = self._gathered_scheduler if self._dp is not None \
            and self._dp.shard else self._scheduler_state()
        profiles = self._profiles
        try:  # raises before anything changes if nothing fits
            self._profile(x, y)
            chosen = self._plan_for(sizes)
        except BaseException:
            self._profiles = profiles  # (the packs stay those of the first shapes)
            raise
        for pack in self._runtime.packs:
            pack.release()
        self._runtime.close()
        self._runtime = None
        self._plans.clear()
        self.lr_schedulers = []
        retie(self._ties)  # the new packs split tied weights afresh
        self._ties = []
        with torch.no_grad():
            for k, v in self.chain.model.state_dict(keep_vars=True).items():
                v.data = weights[k].to(v.device)
        # (after the values are back: a layout takes each tensor's shape)
        self._layer_layouts = [Layout([m], self.precision.dtype_of) for m in self.chain.layers]
        self._pending_optimizer = optimizer_state
        self._pending_scheduler = scheduler_state
        self._fixed = None
        self._first_plan(x, y, sizes, key, chosen)
        return self._plans[key]

    def _auto_micro_batch_size(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                               targets: torch.Tensor) -> int:
        """micro_batch_size='auto': the largest size with a plan, per batch shape."""
        xs, ys, _, _ = split_batch(inputs, targets, 2)  # (2: BatchNorm needs two samples)
        n = targets.shape[0]
        key = (n,) + tuple((tuple(t.shape[1:]), t.dtype) for t in xs[0])
        if key not in self._auto_sizes:
            self._second_input = xs[1] if len(xs) > 1 else None
            self._profile(xs[0], ys[0])  # sizes per sample; the plan scales them
            self._auto_sizes[key], chosen = largest_micro_batch(
                n, partial(self._plan_for, fixed=self._fixed))
            if self._runtime is None:  # the first step builds its packs from this plan
                self._auto_plan = chosen
        return self._auto_sizes[key]

    def record_step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                    targets: torch.Tensor, path: str | os.PathLike[str]) -> float:
        """Run one :meth:`step` and write what happened to the JSON file ``path``.

        The file holds, per task of the schedule, its start and end (seconds since the step
        began) and the bytes each tier held after it; the step's bytes, busy and stall seconds
        per link and peaks per tier; and the plan with its prediction. ``harmony report --run
        path`` shows measured next to predicted. Returns the step's loss.
        """
        from harmony.report import plan_to_json

        before = (dict(self.stats.bytes_moved), dict(self.stats.busy_seconds),
                  dict(self.stats.stall_seconds))
        for tier in self.tiers.values():
            tier.reset_peak()
        record: list[dict[str, object]] = []
        t0 = time.perf_counter()
        first = self._runtime is None
        if self._runtime is not None:
            self._runtime.record = record
        try:
            if first:  # the first step plans and builds packs: record the one after it
                self.step(inputs, targets)
                assert self._runtime is not None
                self._runtime.record = record
                for tier in self.tiers.values():
                    tier.reset_peak()
                before = (dict(self.stats.bytes_moved), dict(self.stats.busy_seconds),
                          dict(self.stats.stall_seconds))
                t0 = time.perf_counter()
            loss = self.step(inputs, targets)
        finally:
            if self._runtime is not None:
                self._runtime.record = None
        seconds = time.perf_counter() - t0
        assert self._plan is not None

        def delta(now: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
            return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0)}

        data = {
            "format": "harmony-step/1", "step": self.step_count - 1, "seconds": seconds,
            "loss": loss, "tasks": record,
            "bytes_moved": delta(self.stats.bytes_moved, before[0]),
            "busy_seconds": delta(self.stats.busy_seconds, before[1]),
            "stall_seconds": delta(self.stats.stall_seconds, before[2]),
            "peak_bytes": {loc.value: tier.peak for loc, tier in self.tiers.items()},
            "budgets": {"device": self.device_memory, "host": self.host_memory},
            "plan": plan_to_json(self._plan)}
        Path(path).write_text(json.dumps(data))
        return loss

    # -- results ----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The plan of the last step (None before the first step)."""
        return self._plan

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under the model's own ``state_dict()`` keys, as CPU tensors."""
        self._weights_arrived()
        model_sd = self.chain.model.state_dict(keep_vars=True)
        if self._runtime is None:
            return {k: v.detach().cpu().clone() for k, v in model_sd.items()}
        found: dict[int, torch.Tensor] = {}
        for pack in self._runtime.packs:
            flat, masters = pack.home_weights(), self._masters(pack)
            for e in pack.layout.entries:  # trainable: the masters (fp32 in mixed precision)
                found[id(e.tensor)] = e.gview(masters) if e.trainable else e.view(flat)
        for tie in self._ties:  # a tied weight's copies show the owner's master
            for sharer in tie.sharers:
                found[id(sharer.copy)] = found[id(tie.master)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out = {}
        for k, v in model_sd.items():
            src = found.get(id(v))
            out[k] = (src if src is not None else v.detach()).cpu().clone()
        if self._pipeline is not None:  # each key from the rank that trains it (collective)
            owned = {k for k, v in model_sd.items() if id(v) in found}
            return self._pipeline.gather_state(out, owned)
        return out

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
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the full training state under directory ``path``, atomically.

        The checkpoint holds the weights (model ``state_dict`` keys), the optimizer state keyed
        by parameter name, the step count, the seed and the plan; the previous checkpoint in
        ``path`` is replaced only once the new one is complete. Returns the checkpoint's folder.

        With ``parallel="data"`` rank 0 writes and every rank returns the folder (call it on
        every rank).

        Raises:
            OSError: the disk is full or unwritable; the previous checkpoint stays loadable.
        """
        if self._dp is not None:  # rank 0 writes; the others wait for its folder
            if not self._dp.shard:
                return self._dp.save(lambda: self._save(path))
            full = self._full_optimizer_state()
            weights = self.state_dict()  # (collective in mixed precision: the masters)
            return self._dp.save(lambda: self._save(path, full, weights))
        return self._save(path)

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
        tensors, scalars, groups = optimizer if optimizer is not None \
            else self._optimizer_state()
        if self._pipeline is not None:  # rank 0 writes every stage's state (collective)
            tensors, scalars, groups = self._pipeline.gather_optimizer(tensors, scalars, groups)
        meta = {"step_count": self.step_count, "seed": self.seed,
                "schedule": self.schedule_name, "micro_batch_size": self.micro_batch_size,
                "optimizer_scalars": scalars, "optimizer_groups": groups,
                "lr_scheduler": self._gathered_scheduler if optimizer is not None
                else self._scheduler_state(),
                "precision": self.precision.state_dict(),
                "plan": None if self._plan is None else {
                    "bounds": [list(b) for b in self._plan.bounds],
                    "placement": self._plan.placement.to_json(),
                    "forward_group": self._plan.forward_group}}
        if weights is None:
            weights = self.state_dict()
        if self._pipeline is not None:
            return self._pipeline.on_rank0(
                lambda: checkpoint.save(path, self.step_count, weights, tensors, meta))
        return checkpoint.save(path, self.step_count, weights, tensors, meta)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore the state :meth:`save` wrote (the newest complete checkpoint under ``path``).

        Raises:
            FileNotFoundError: no complete checkpoint there.
            harmony.CheckpointError: a truncated or corrupted file, or a checkpoint of another
                model (the message lists the differing keys or shapes); nothing is changed.
        """
        weights, opt_tensors, meta = checkpoint.load(path)
        if self._dp is None or self._dp.group.rank == 0:  # (save() keeps one checkpoint)
            checkpoint.finish_interrupted_save(path)
        current = self.chain.model.state_dict(keep_vars=True)
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
        homes, flats = self._home_views()
        with torch.no_grad():
            for k, v in current.items():
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

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the trained weights for use without harmony; returns the folder.

        ``path/model.safetensors`` holds :meth:`state_dict` (the model's own keys). For a model
        from Hugging Face transformers, ``path/config.json`` is written too, so
        ``AutoModelForCausalLM.from_pretrained(path)`` (or the model's class) loads it.
        With ``parallel="pipeline"`` every rank calls it and rank 0 writes the whole model.
        """
        st = checkpoint._safetensors()
        out = Path(path)
        weights = self.state_dict()  # fresh CPU copies: no two keys share memory
        if self._pipeline is not None and self._pipeline.rank != 0:
            return out
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".model.safetensors.tmp"
        st.save_file(weights, tmp, metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
        config = getattr(self.chain.model, "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(out / "config.json")
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
        key_of = {id(v): k for k, v in self.chain.model.state_dict(keep_vars=True).items()}
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

    def close(self) -> None:
        """Free buffers and stop copy threads; idempotent."""
        if self._closed:
            return
        with contextlib.suppress(Exception):  # (a broken group fails them at once)
            self._weights_arrived()
        self._closed = True
        self._engine.close()
        if self._runtime is not None:
            self._runtime.close()
            for pack in self._runtime.packs:
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

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_plan(path: str | os.PathLike[str]) -> Plan:
    from harmony.report import plan_from_json  # the JSON format lives with the report

    try:
        data = json.loads(Path(path).read_text())
        return plan_from_json(data.get("plan", data))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"plan={str(path)!r} is not a plan written by harmony report --json "
                         f"({type(err).__name__}: {err})") from err


_BANDWIDTH: dict[str, dict[str, float]] = {}


def _bandwidth(device: torch.device) -> dict[str, float]:
    """Bytes/s of host<->device copies, measured once per device type (64 MiB copies)."""
    key = str(device)
    if key not in _BANDWIDTH:
        n = 64 << 20
        src = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        src.copy_(dst)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bw = 2 * n / max(time.perf_counter() - t0, 1e-9)
        _BANDWIDTH[key] = {"host->device": bw, "device->host": bw}
    return _BANDWIDTH[key]
