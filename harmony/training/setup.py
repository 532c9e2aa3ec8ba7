"""What a trainer sets up once, at construction, before anything is profiled
(:func:`set_up`).

In this order: the compute device with the process groups of pipeline or data parallelism and
the precision checked on that device (:func:`place`); the model's chain, held by no other
trainer, and where its layers' values come from; a given plan; the facts about the model that
planning and checkpoints need: layouts, tied weights, where each tensor came from
(:class:`ModelFacts`); the optimizer-state ratio (:func:`probe_k_ratio`); the refusals no plan
can avoid; and the NVMe store and the tiers that hold the training state within the budgets
(:func:`make_tiers`), with the swap engine.

Example::

    setup = set_up(model, TrainerConfig(micro_batch_size=4, device_memory="64MiB"))
    setup.holdings.tiers[Loc.DEVICE].capacity     # 64 MiB
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harmony.model.chain import Chain
from harmony.model.inplace import InputCopies
from harmony.model.layout import Layout
from harmony.model.materialize import Materializer, Scratch
from harmony.model.precision import Precision
from harmony.model.tied import shared_parameters
from harmony.parallel.data_parallel import DataParallel
from harmony.parallel.dist import bind_device
from harmony.parallel.pipeline import Pipeline
from harmony.planning.device_memory import check_fits
from harmony.planning.plan import Plan
from harmony.planning.profile import optimizer_state_ratio
from harmony.planning.refusals import refuse_before_training
from harmony.planning.request import Tied
from harmony.runtime.host_memory import bound_malloc
from harmony.training.config import OptimizerFactory, TrainerConfig
from harmony.training.holdings import Holdings, model_tensors
from harmony.training.ownership import check_free
from harmony.training.planner import given_plan
from harmony.training.user_checks import checked_optimizer_factory
from schedules.task import Loc
from swap.engine import SwapEngine
from swap.nvme import NvmeStore, check_root
from swap.stats import Stats
from swap.streams import host_pinning
from swap.tier import Tier, fmt_bytes

__all__ = ["ModelFacts", "Setup", "make_tiers", "place", "probe_k_ratio", "set_up"]


@dataclass(frozen=True)
class Setup:
    """What :func:`set_up` made.

    Attributes:
        holdings: the trainer's surroundings.
        facts: the model's facts.
        given: the plan the trainer was given (``plan=``), checked; None.
        k_ratio: optimizer-state bytes per parameter byte, as probed.
        optimizer_factory: the optimizer factory, checked when called.
        device_memory, host_memory: the budgets in bytes (None: no limit).
    """

    holdings: Holdings
    facts: ModelFacts
    given: Plan | None
    k_ratio: float
    optimizer_factory: OptimizerFactory
    device_memory: int | None
    host_memory: int | None


def set_up(model: nn.Module | Sequence[nn.Module], config: TrainerConfig) -> Setup:
    """Set up a trainer of ``model`` (see the module docstring for the order).

    Raises:
        ValueError: what :func:`place`, :class:`~harmony.model.chain.Chain`,
            :func:`~harmony.training.ownership.check_free`, the materializer,
            :func:`~harmony.training.planner.given_plan`, :meth:`ModelFacts.of`,
            :meth:`ModelFacts.check_layers_fit`, :func:`swap.nvme.check_root`,
            :func:`~harmony.planning.refusals.refuse_before_training` and the NVMe store
            refuse, in that order.
        harmony.WeightsError: ``weights`` unreadable, or missing or misshaping a tensor.
    """
    device, dp, pipeline, precision = place(config)
    device_memory, host_memory = config.device_memory_bytes, config.host_memory_bytes
    chain = Chain(model)
    check_free(chain.model, chain.layers)  # another trainer's: ValueError
    # Where the values of a model built on the meta device come from, layer by layer
    # (or of any model, from weights=); ValueError/WeightsError naming the fix.
    materializer = Materializer(chain, init=config.init, weights=config.weights,
                                seed=config.seed)
    given = given_plan(config, len(chain))  # plan=: ValueError naming the fix
    optimizer_factory = checked_optimizer_factory(config.optimizer_factory)
    stats = Stats()
    facts = ModelFacts.of(chain, precision, config, pipeline)
    facts.check_layers_fit(device_memory, chain.names)
    k_ratio = probe_k_ratio(optimizer_factory)
    if config.nvme_dir is not None:  # (a bad value is named before any budget arithmetic)
        check_root(config.nvme_dir)
    if pipeline is None:  # (a stage holds part of the model: its plan checks it)
        # What no plan can fix, with the numbers, before anything is profiled; with a
        # sharded optimizer each rank holds only its packs' optimizer state.
        refuse_before_training(
            chain.model, facts.layouts,
            0.0 if config.shard_optimizer else precision.k_ratio(k_ratio),
            device, device_memory, host_memory, config.nvme_dir, built=not materializer.meta)
    store = (NvmeStore(config.nvme_dir, backend=config.nvme_backend)  # ValueError if unusable
             if config.nvme_dir is not None else None)
    tiers = make_tiers(device, device_memory, host_memory, store)
    for tier in tiers.values():  # (stats.reset() restarts the peaks from the tiers' use)
        stats.on_reset(tier.reset_peak)
    # Layers being materialized live in host memory, counted in the host budget (on
    # CPU, in the device budget when the host's is full: that is host memory too).
    materializer.memory(Scratch([tiers[Loc.HOST]] + (
        [tiers[Loc.DEVICE]] if device.type == "cpu" else [])))
    engine = SwapEngine(device, stats, tiers[Loc.DEVICE])
    # Layers that change their input in place get private copies (model/inplace.py).
    holdings = Holdings(chain, materializer, device, precision, stats, tiers, store, engine,
                        dp, pipeline, InputCopies(), facts.first_key)
    return Setup(holdings, facts, given, k_ratio, optimizer_factory, device_memory,
                 host_memory)


def place(config: TrainerConfig) -> tuple[torch.device, DataParallel | None, Pipeline | None,
                                          Precision]:
    """The compute device, data parallelism or this rank's pipeline stage (joining the
    process group), and the trainer's own Precision, checked on that device.

    Raises:
        ValueError: no process group or torchrun environment, bad ``stages``, a precision
            the device cannot train in, or a ``device_memory`` beyond what the GPU has free.
    """
    # Pipeline parallelism: this rank's stage, its plan and its sends
    # (harmony.parallel.pipeline).
    pipeline = Pipeline(config.device, config.stages) if config.parallel == "pipeline" else None
    # "cuda" means this rank's GPU (LOCAL_RANK)
    device = pipeline.device if pipeline is not None else torch.device(config.device)
    # Data parallelism (harmony/parallel/data_parallel.py); None for one process.
    dp = DataParallel.create(config.parallel, device, config.shard_optimizer)
    if dp is not None:
        device = dp.device  # "cuda" -> this rank's GPU
    if device.type == "cuda":  # its streams, events and generators are this GPU's
        device = bind_device(device)
    precision = Precision.parse(config.precision)  # (the trainer's own copy)
    precision.check_device(device)
    # Freed buffers go back to the kernel, so the process stays within its budgets.
    bound_malloc()
    if device.type == "cuda":  # the budget must fit beside the context and workspaces
        check_fits(config.device_memory_bytes, torch.cuda.mem_get_info(device)[0], device)
    return device, dp, pipeline, precision


@dataclass(frozen=True)
class ModelFacts:
    """What a trainer knows of its model before planning.

    Attributes:
        layouts: each layer's layout (its tensors, flat offsets, dtypes).
        origin: per tensor (by id), the device it came from and its bytes at full precision:
            ``close()`` gives the trained values back there (a tensor on the meta device
            comes back on the CPU).
        tied: per trainable weight used by several layers (tied weights), those layers and
            its gradient's bytes.
        params: the model's parameters with each tied one once, as ``clip_grad_norm_`` sees
            them (kept before the packs are built: splitting the ties gives sharing packs
            copies of their own).
        first_key: for a tensor under several keys of the model's state dict, its first key,
            which names its optimizer state whichever packs the plan makes (so checkpoints
            load across plans).
        shared: whether some parameter, trainable or frozen, is used by several layers: the
            packs are then built with copies for the packs sharing it (a frozen one too, which
            one pack's buffers cannot hold for another: :func:`harmony.model.tied.untie`).
    """

    layouts: list[Layout]
    origin: dict[int, tuple[torch.device, int]]
    tied: list[Tied]
    params: list[nn.Parameter]
    first_key: dict[int, str]
    shared: bool = False

    @classmethod
    def of(cls, chain: Chain, precision: Precision, config: TrainerConfig,
           pipeline: Pipeline | None) -> ModelFacts:
        """The facts of ``chain``'s model, refusing tied weights with a sharded optimizer or
        pipeline stages.

        Raises:
            ValueError: tied weights with ``shard_optimizer=True`` or
                ``parallel="pipeline"``; a buffer shared by several layers.
        """
        layouts = [Layout([m], precision.dtype_of) for m in chain.layers]
        origin = {id(e.tensor): (torch.device("cpu") if e.tensor.is_meta else e.tensor.device,
                                 e.shape.numel() * e.master_dtype.itemsize)
                  for layout in layouts for e in layout.entries}
        # Parameters shared across layers are tied weights (harmony/model/tied.py); buffers
        # are refused. The planner gets, per tied weight, the layers using it and its
        # gradient's bytes.
        tied: list[Tied] = []
        shared = shared_parameters(layouts, chain.names)
        for tid, layers in shared.items():
            e = next(e for e in layouts[layers[0]].entries if id(e.tensor) == tid)
            if e.trainable:
                tied.append((tuple(layers), e.shape.numel() * e.master_dtype.itemsize))
        if tied and config.shard_optimizer:
            raise ValueError("shard_optimizer=True with tied weights (a parameter used by several "
                             "layers) is not supported: their gradients are summed across packs "
                             "that different ranks would own; untie them or shard_optimizer=False")
        if tied and pipeline is not None:
            raise ValueError("parallel='pipeline' with tied weights (a parameter used by several "
                             "layers, e.g. an embedding and an LM head) is not supported: the "
                             "stages would each hold a copy; untie them or use parallel=None")
        params = list(chain.model.parameters())
        keys: dict[int, list[str]] = {}
        for k, v in model_tensors(chain).items():
            keys.setdefault(id(v), []).append(k)
        first_key = {i: ks[0] for i, ks in keys.items() if len(ks) > 1}
        # (pipeline stages: a trainable one is refused above; a frozen one gets a copy per
        # pack of the stage that uses it, as in one process)
        return cls(layouts, origin, tied, params, first_key, shared=bool(shared))

    def origin_device(self, entry: Any) -> torch.device:
        """The device layout entry ``entry``'s tensor came from (the CPU if unknown)."""
        return self.origin.get(id(entry.tensor), (torch.device("cpu"), 0))[0]

    def check_layers_fit(self, device_memory: int | None, names: list[str]) -> None:
        """Refuse a device budget smaller than some layer's weights and gradients.

        Raises:
            ValueError: naming the layer, its bytes and the budget to use instead.
        """
        if device_memory is None:
            return
        for i, layout in enumerate(self.layouts):
            need = layout.w_bytes + layout.g_bytes
            if need > device_memory:
                raise ValueError(
                    f"device_memory={fmt_bytes(device_memory)} is smaller than layer {i} "
                    f"({names[i]!r}), whose weights and gradients alone need "
                    f"{fmt_bytes(need)}; use device_memory>={fmt_bytes(need)} plus room for "
                    "activations, or split that layer")


def probe_k_ratio(factory: OptimizerFactory) -> float:
    """Optimizer-state bytes per parameter byte
    (:func:`harmony.planning.profile.optimizer_state_ratio`);
    2.0, Adam's, for an optimizer that cannot be probed on a stand-in parameter."""
    try:
        return optimizer_state_ratio(factory)
    except Exception:
        return 2.0


def make_tiers(device: torch.device, device_memory: int | None, host_memory: int | None,
               store: NvmeStore | None) -> dict[Loc, Tier]:
    """The device and host tiers with their budgets (and the NVMe tier's accounting when
    there is a store)."""
    # CPU buffers that files are read into or written from come page-aligned from the
    # store, so its direct I/O needs no staging copy (pinned CUDA buffers are page-aligned
    # too: swap.pinned).
    pin = host_pinning(device)
    aligned = store.allocate if store is not None else None
    tiers = {
        # On CPU the device tier stands in for a GPU whose caching allocator keeps freed
        # blocks: its pool keeps freed buffers for reuse; but they are host memory, so
        # they share the budget (used + cached <= device_memory).
        Loc.DEVICE: Tier("device", device, device_memory,
                         cache_limit=None if device.type == "cpu" else 0,
                         share_capacity=device.type == "cpu",
                         alloc=aligned if device.type == "cpu" else None),
        Loc.HOST: Tier("host", torch.device("cpu"), host_memory, pin=pin,
                       share_capacity=True, alloc=None if pin else aligned),
    }
    if store is not None:
        tiers[Loc.NVME] = Tier("nvme", torch.device("cpu"), None)
    return tiers
