"""CUDA: the same exactness and budgets on a GPU (skipped without one).

What is compared, and why:

* harmony on a GPU against plain PyTorch on the same GPU, bit for bit, with the optimizer
  stepping where harmony steps it: a pack whose optimizer state lives on the device updates
  with CUDA's AdamW, one homed on the host (or NVMe) with the CPU's. The reference does the
  same (its AdamW on the GPU, or on CPU copies of the weights and gradients), so every kernel
  and every addition is the same. Kernels with run-to-run nondeterminism are switched off
  (``torch.use_deterministic_algorithms``, the math attention backend), in both runs.
* a CPU-stepped AdamW against a CUDA-stepped one is *not* bit for bit: the two
  implementations round differently (fused multiply-adds, the order of the bias corrections,
  ``foreach`` kernels), by about one unit in the last place per step. Where a test compares
  them it says so and uses a relative tolerance.

Plans are pinned (``plan=``) wherever a test needs a placement: the planner may keep small
models wholly on the device.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import harmony
from harmony.planning.device_memory import reserved_allowance
from harmony.planning.planner import Plan
from schedules.placement import Placement
from schedules.task import Loc
from swap.tier import Tier
from tests.models import MODELS, assert_weights_close, layers_of, training_state_bytes

# cuBLAS is deterministic only with a fixed workspace configuration (read when it starts).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices")

MBS = 3


def _adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Kernels that give the same bits on every run (for both harmony and the reference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def _batches(model: str, n: int = 3, size: int = 7, seed: int = 1) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [MODELS[model][2](size, g) for _ in range(n)]


def reference(model: str, batches: list[Any], device: torch.device, update_on: str,
              dropout: float = 0.0, mbs: int = MBS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plain PyTorch on ``device``: micro-batch gradient accumulation (each layer call under
    harmony.layer_rng, as harmony draws its dropout masks), then AdamW on ``update_on``
    (``"device"``: on the GPU's parameters; ``"host"``: on fp32 CPU copies of the parameters
    and gradients, copied back after the step)."""
    factory, loss_fn, _ = MODELS[model]
    net = factory(dropout).to(device)
    layers = layers_of(net)
    params = list(net.parameters())
    masters = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    opt = _adamw(params if update_on == "device" else masters)
    for step, (x, y) in enumerate(batches):
        xs, ys = x.split(mbs), y.split(mbs)
        for m, (xm, ym) in enumerate(zip(xs, ys)):
            h: Any = xm.to(device)
            for i, layer in enumerate(layers):
                with harmony.layer_rng(seed, step, m, i, device):
                    h = layer(*h) if isinstance(h, tuple) else layer(h)
            (loss_fn(h, ym.to(device)) * (ym.shape[0] / y.shape[0])).backward()
        if update_on == "host":
            for p, q in zip(params, masters):
                q.grad = None if p.grad is None else p.grad.cpu()
        opt.step()
        opt.zero_grad()
        if update_on == "host":
            with torch.no_grad():
                for p, q in zip(params, masters):
                    p.copy_(q)
            for p in params:
                p.grad = None
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def pinned_plan(model: str, w: Loc, x: Loc, schedule: str = "harmony") -> Plan:
    """A plan with several packs (found on CPU under a small budget) whose every pack has its
    weights and optimizer state at ``w`` and its activations at ``x``."""
    factory, loss_fn, data = MODELS[model]
    p = None
    for part in (4, 3, 2):  # the smallest budget with a plan: several packs
        budget = training_state_bytes(factory(0.0), 8) // part
        try:
            with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=MBS,
                                 device_memory=budget, schedule=schedule) as t:
                t.step(*data(2 * MBS, torch.Generator().manual_seed(0)))
                p = t.plan
            break
        except harmony.InfeasiblePlan:
            continue
    assert p is not None and len(p.bounds) > 1, "the planning run should make several packs"
    placement = Placement.uniform(len(p.bounds), w, x)
    return Plan(p.bounds, p.schedule.with_tasks(list(p.schedule.tasks), placement, 0), p.sizes,
                p.predicted)


def train(model: str, batches: list[Any], dropout: float = 0.0, **kw: Any
          ) -> tuple[dict[str, torch.Tensor], harmony.Trainer]:
    factory, loss_fn, _ = MODELS[model]
    kw.setdefault("device", "cuda")
    with harmony.Trainer(factory(dropout), loss_fn, optimizer=_adamw, micro_batch_size=MBS,
                         **kw) as t:
        for x, y in batches:
            t.step(x, y)
        return t.state_dict(), t


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
@pytest.mark.parametrize("where", [Loc.DEVICE, Loc.HOST])
def test_swapping_on_cuda_equals_pytorch_on_cuda(model: str, schedule: str, where: Loc) -> None:
    """Weights and optimizer state at ``where`` (updated there), activations swapped to the
    host: bit for bit the reference that steps AdamW on the same side."""
    batches = _batches(model)
    plan = pinned_plan(model, where, Loc.HOST, schedule)
    with deterministic():
        got, t = train(model, batches, plan=plan)
        want = reference(model, batches, torch.device("cuda"), where.value)
    assert t.plan is not None and set(t.plan.placement.w) == {where}
    assert t.stats.bytes_moved["device->host"] > 0  # the activations did swap
    assert_equal(got, want)


@pytest.mark.parametrize("model", list(MODELS))
def test_cpu_and_cuda_steps_agree_up_to_rounding(model: str) -> None:
    """The same gradients stepped by CUDA's AdamW (state on the device) and by the CPU's
    (state on the host): equal up to the implementations' rounding, not bit for bit (see the
    module docstring)."""
    batches = _batches(model)
    with deterministic():
        on_device, _ = train(model, batches, plan=pinned_plan(model, Loc.DEVICE, Loc.DEVICE))
        on_host, _ = train(model, batches, plan=pinned_plan(model, Loc.HOST, Loc.HOST))
    assert_weights_close(on_host, on_device, rtol=1e-5)


@pytest.mark.parametrize("model", list(MODELS))
def test_nvme_homes_on_cuda_equal_host_homes(model: str, tmp_path: Path) -> None:
    """W, K and X in NVMe files reach the GPU through host staging (swap.staging): the same
    weights as with every home on the host, both updating on the CPU; the host budget holds
    the staging buffers too."""
    batches = _batches(model, seed=2)
    state = training_state_bytes(MODELS[model][0](0.0), 8)
    with deterministic():
        want, _ = train(model, batches, plan=pinned_plan(model, Loc.HOST, Loc.HOST))
        host = state  # (every pack on NVMe: its update and the staging buffers need host room)
        got, t = train(model, batches, plan=pinned_plan(model, Loc.NVME, Loc.NVME),
                       host_memory=host, nvme_dir=str(tmp_path))
    assert t.plan is not None and set(t.plan.placement.w) == {Loc.NVME}
    assert t.stats.bytes_moved["nvme->host"] > 0 and t.stats.bytes_moved["host->device"] > 0
    assert t.stats.bytes_moved["device->nvme"] > 0  # activations staged out, then back
    assert t.stats.peak_bytes["host"] <= host
    assert_equal(got, want)


@two_gpus
@pytest.mark.parametrize("device,current", [("cuda:1", 0), ("cuda", 1)])
def test_a_trainer_on_the_second_gpu(device: str, current: int) -> None:
    """On cuda:1 while the process's current device is 0 (or on "cuda" while it is 1): compute
    waits for its copies on cuda:1's stream, dropout draws from cuda:1's generator per layer,
    and the result is bit for bit plain PyTorch on cuda:1."""
    model, dropout = "transformer", 0.1
    batches = _batches(model)
    torch.cuda.set_device(current)
    gpu1 = torch.device("cuda", 1)
    with deterministic():
        got, t = train(model, batches, dropout=dropout, device=device,
                       plan=pinned_plan(model, Loc.HOST, Loc.HOST))
        assert t.device == gpu1 and torch.cuda.current_device() == 1
        want = reference(model, batches, gpu1, "host", dropout=dropout)
    assert_equal(got, want)
    torch.cuda.set_device(0)


# -- budgets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
def test_the_allocator_stays_within_the_budget(model: str) -> None:
    """What the caching allocator *reserves* while training, measured from after the bandwidth
    probe and the cuBLAS workspaces exist, stays within the budget plus the allocator's own
    rounding and segments; the trainer reports the same figure."""
    factory = MODELS[model][0]
    budget = training_state_bytes(factory(0.0), 8) // 2
    plan = pinned_plan(model, Loc.HOST, Loc.HOST)
    batches = _batches(model)
    train(model, batches[:1], plan=plan)  # probe, workspaces, kernels' first use
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_allocated, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    _, t = train(model, batches, plan=plan, device_memory=budget)
    peak = t.stats.peak_bytes
    assert peak["device"] <= budget
    assert torch.cuda.max_memory_allocated() - base_allocated <= budget + (1 << 20)
    # Small blocks: their rounding and a 2 MiB segment partly used, and one more segment the
    # pool's fragmentation may leave (these models' blocks are all under 1 MiB).
    allowance = reserved_allowance([budget // 4] * 2) + (2 << 20)
    assert torch.cuda.max_memory_reserved() - base_reserved <= budget + allowance
    assert 0 < peak["device reserved"] <= budget + allowance


def test_host_buffers_are_pinned_at_their_own_size() -> None:
    """Host buffers are page-locked (cudaHostRegister), and PyTorch's caching host allocator,
    which would round them to powers of two and keep them, is not used for them."""
    factory, loss_fn, data = MODELS["mlp"]
    stats = getattr(torch.cuda, "host_memory_stats", None)
    before = stats()["allocated_bytes.current"] if stats is not None else None
    with harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2, device="cuda",
                         plan=pinned_plan("mlp", Loc.HOST, Loc.HOST)) as t:
        t.step(*data(4, torch.Generator().manual_seed(0)))
        assert t.runtime is not None
        assert all(p.home_w is not None and p.home_w.is_pinned() for p in t.runtime.packs)
        assert t.stats.peak_bytes["host pinned"] > 0  # reported beside the accounted peak
        if before is not None:
            assert stats()["allocated_bytes.current"] == before


def test_a_budget_larger_than_the_free_gpu_is_refused() -> None:
    factory, loss_fn, _ = MODELS["mlp"]
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="does not fit on cuda"):
        harmony.Trainer(factory(0.0), loss_fn, device="cuda", device_memory=free)


# -- the host never waits for the device -------------------------------------------------------

class HostSyncs:
    """Counts the times the main thread blocks on the device: ``Event.synchronize`` and
    ``torch.cuda.synchronize`` (wrapped), and every synchronizing operation PyTorch reports in
    its sync-debug mode (``Stream.synchronize``, ``.item()``, ``.cpu()``, blocking copies)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.where: list[str] = []
        event_sync, device_sync = torch.cuda.Event.synchronize, torch.cuda.synchronize

        def counted(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
            def run(*args: Any, **kw: Any) -> Any:
                self._seen(what)
                return fn(*args, **kw)
            return run

        monkeypatch.setattr(torch.cuda.Event, "synchronize", counted(event_sync, "event"))
        monkeypatch.setattr(torch.cuda, "synchronize", counted(device_sync, "device"))

    def _seen(self, what: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self.count += 1
            self.where.append(what)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        mode = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            show = warnings.showwarning

            def record(message: Any, category: Any, *args: Any, **kw: Any) -> None:
                if "synchroniz" in str(message):
                    self._seen(str(message).splitlines()[0][:80])
                else:
                    show(message, category, *args, **kw)

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(mode)


def test_host_synchronizations_do_not_grow_with_micro_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per step the host may wait for the device a bounded number of times (a host-homed
    pack's gradients before its CPU update, the loss's finiteness check, the step's end),
    never once per micro-batch."""
    model = "transformer"
    factory, loss_fn, data = MODELS[model]
    plan = pinned_plan(model, Loc.HOST, Loc.HOST)
    syncs = HostSyncs(monkeypatch)
    counts = {}
    for mbs in (8, 2):  # 2 and 8 micro-batches of a batch of 16
        g = torch.Generator().manual_seed(3)
        with harmony.Trainer(factory(0.0), loss_fn, optimizer=_adamw, micro_batch_size=mbs,
                             device="cuda", plan=plan) as t:
            t.step(*data(16, g))  # the first step profiles and plans
            x, y = data(16, g)
            syncs.count, syncs.where = 0, []
            with syncs.counting():
                t.step(x, y)
            counts[mbs] = (syncs.count, list(syncs.where))
    packs = len(plan.bounds)
    assert counts[2][0] == counts[8][0], counts
    assert counts[2][0] <= packs + 3, counts


# -- large tensors, poisoned pools -------------------------------------------------------------

def _wide_mlp(width: int = 2048, depth: int = 6) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1], torch.nn.Linear(width, 16))


def test_large_tensors_with_poisoned_host_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 MiB layers swapping every step, with every host buffer overwritten (0xFF, a NaN in
    fp32) the moment it goes back to its pool: a buffer released while a copy could still read
    or write it would show as NaN or wrong weights. Bit for bit the reference."""
    poisoned = [0]
    give = Tier._give

    def poison(self: Tier, buf: torch.Tensor | None) -> None:
        if buf is not None and self.name == "host":
            buf.fill_(0xFF)
            poisoned[0] += 1
        give(self, buf)

    monkeypatch.setattr(Tier, "_give", poison)
    MODELS_BIG = {"wide": (lambda d: _wide_mlp(), torch.nn.functional.cross_entropy,
                           lambda n, g: (torch.randn(n, 2048, generator=g),
                                         torch.randint(0, 16, (n,), generator=g)))}
    monkeypatch.setitem(MODELS, "wide", MODELS_BIG["wide"])
    batches = _batches("wide", n=3, size=64)
    state = training_state_bytes(_wide_mlp(), 8)
    with deterministic():
        got, t = train("wide", batches, device_memory=state // 4, host_memory=state * 2,
                       plan=pinned_plan("wide", Loc.HOST, Loc.HOST))
        want = reference("wide", batches, torch.device("cuda"), "host")
    assert poisoned[0] > 0 and t.stats.bytes_moved["host->device"] > 3 * state // 4
    assert_equal(got, want)


def test_copies_are_timed_and_hidden_on_the_gpu() -> None:
    """Busy and stall times come from events: every copy's busy time is counted once the step
    ends, and the compute stream waits less than the copies take."""
    model = "transformer"
    batches = _batches(model, n=4, size=12)
    _, t = train(model, batches, plan=pinned_plan(model, Loc.HOST, Loc.HOST))
    busy, stall = t.stats.busy_seconds, t.stats.stall_seconds
    assert busy["host->device"] > 0 and busy["device->host"] > 0
    assert 0 <= stall.get("host->device", 0.0) <= busy["host->device"] + t.stats.seconds["step"]
