"""Mixed precision: bf16/fp16 training against torch.autocast, accounting by dtype, fp16 loss
scaling, and bad input.

bf16 runs cannot be bitwise equal to anything plain PyTorch does (harmony keeps W in bf16 where
autocast casts fp32 parameters on the fly; both round the same products to bf16, in different
places), so they are compared with a tolerance relative to bf16's own noise: over 20 steps of
SGD with momentum, the distance between harmony's weight change and the autocast reference's
must stay below twice the reference's own distance from an fp32 run (bf16's noise on this
model) and below 5% of the change itself. (Twice, not once: harmony's residual stream and
embeddings are bf16 where autocast's stay fp32, as in any trainer whose weights are bf16, so
it is a little further from fp32 than autocast is.) A missed update, a lost master or
gradients accumulated in the wrong place moves the weights by a sizeable fraction of the change
and fails this; rounding does not. A model of Linear layers only has no such difference: there
harmony's bf16 weights are exactly autocast's casts of the same fp32 masters, and gradients
accumulate in fp32 in the same order, so the result is bitwise equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from harmony.precision import Precision
from schedules.task import Loc
from tests.models import MODELS, layers_of, training_state_bytes

STEPS = 20


def _sgd(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def _batches(model: str, steps: int = STEPS, n: int = 6) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [MODELS[model][2](n, g) for _ in range(steps)]


def _reference(model: str, batches: list[tuple[torch.Tensor, ...]], mbs: int,
               dtype: torch.dtype | None, make_opt: Callable = _sgd) -> dict[str, torch.Tensor]:
    """Plain PyTorch, fp32 parameters, gradient accumulation; forward and loss under
    ``torch.autocast(device_type="cpu", dtype=dtype)`` (None: plain fp32)."""
    factory, loss_fn, _ = MODELS[model]
    net = factory(0.0)
    layers = layers_of(net)
    opt = make_opt(list(net.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                h: object = xm
                for layer in layers:
                    h = layer(*h) if isinstance(h, tuple) else layer(h)
                loss = loss_fn(h, ym) * (ym.shape[0] / y.shape[0])
            loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b
                     if b[k].is_floating_point()) ** 0.5)


def _check_tracks_autocast(model: str, got: dict[str, torch.Tensor],
                           batches: list[tuple[torch.Tensor, ...]], mbs: int) -> None:
    init = MODELS[model][0](0.0).state_dict()
    want = _reference(model, batches, mbs, torch.bfloat16)
    fp32 = _reference(model, batches, mbs, None)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == init[k].dtype for k in init)  # fp32 masters, model's own keys
    change = _distance(want, init)
    off = _distance(got, want)
    noise = _distance(want, fp32)
    assert change > 0 and noise > 0
    print(f"{model}: off {off:.3g}, change {change:.3g}, bf16 noise {noise:.3g}")
    assert off < 0.05 * change, (off, change)
    assert off < 2 * noise, (off, noise)


def _train(model: str, batches: list[tuple[torch.Tensor, ...]], mbs: int,
           **kw: object) -> tuple[harmony.Trainer, dict[str, torch.Tensor]]:
    factory, loss_fn, _ = MODELS[model]
    trainer = harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=mbs,
                              **kw)  # type: ignore[arg-type]
    for x, y in batches:
        trainer.step(x, y)
    return trainer, trainer.state_dict()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_bf16_on_device_tracks_autocast(model: str) -> None:
    batches = _batches(model)
    trainer, got = _train(model, batches, 2, precision="bf16")
    with trainer:
        assert trainer.plan is not None and trainer.plan.placement.w[0] is Loc.DEVICE
        _check_tracks_autocast(model, got, batches, 2)


def test_bf16_linear_model_equals_autocast_bitwise() -> None:
    """Linear layers and activations only: every bf16 product is the same as autocast's."""
    batches = _batches("mlp", steps=5)
    budget = training_state_bytes(MODELS["mlp"][0](0.0), 4) // 4
    for device_memory in (None, budget):
        trainer, got = _train("mlp", batches, 2, precision="bf16", device_memory=device_memory)
        with trainer:
            want = _reference("mlp", batches, 2, torch.bfloat16)
            for k in want:
                assert torch.equal(got[k], want[k]), (device_memory, k)


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_bf16_with_swapping_tracks_autocast(schedule: str) -> None:
    """A device budget below the bf16 training state: weights, masters and optimizer state
    live on the host, W crosses the link in bf16, and the accounted peaks stay in budget."""
    model = "transformer"
    batches = _batches(model)
    budget = training_state_bytes(MODELS[model][0](0.0), 4) // 4
    trainer, got = _train(model, batches, 2, precision="bf16", device_memory=budget,
                          schedule=schedule)
    with trainer:
        plan = trainer.plan
        assert plan is not None and len(plan.bounds) > 1
        assert all(loc is Loc.HOST for loc in plan.placement.w), plan.describe(
            trainer.chain.names)
        assert 0 < trainer.stats.peak_bytes["device"] <= budget
        _check_tracks_autocast(model, got, batches, 2)


def test_bf16_with_nvme_homes_tracks_autocast(tmp_path: Path) -> None:
    """Tight device and host budgets put some packs' W and K (fp32 masters included) in
    NVMe files; host peaks stay within budget."""
    model = "transformer"
    batches = _batches(model)
    state = training_state_bytes(MODELS[model][0](0.0), 4)
    trainer, got = _train(model, batches, 2, precision="bf16", device_memory=state // 4,
                          host_memory=state // 2, nvme_dir=str(tmp_path))
    with trainer:
        plan = trainer.plan
        assert plan is not None and Loc.NVME in plan.placement.w, plan.describe(
            trainer.chain.names)
        assert trainer.host_memory is not None
        assert trainer.stats.peak_bytes["host"] <= trainer.host_memory
        on_nvme = [p for p, loc in enumerate(plan.placement.w) if loc is Loc.NVME]
        assert all(f"pack{p}.M" in trainer.store for p in on_nvme)  # type: ignore[operator]
        _check_tracks_autocast(model, got, batches, 2)


def _traffic_trainer(precision: str, plan: object = None,
                     budget: int | None = None) -> harmony.Trainer:
    factory, loss_fn, data = MODELS["transformer"]
    trainer = harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                              device_memory=budget, precision=precision,
                              plan=plan)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        trainer.step(*data(6, g))
    return trainer


def test_bf16_halves_weight_traffic_and_counts_masters_in_k() -> None:
    """Same packs and placement in fp32 and bf16: W crosses the host link in bf16 (half the
    bytes, up to alignment and the fp32 norm weights), exactly as the schedule predicts; K on
    the host holds the fp32 masters besides the optimizer state, as the plan predicted."""
    budget = training_state_bytes(MODELS["transformer"][0](0.0), 4) // 2
    with _traffic_trainer("fp32", budget=budget) as fp32:
        assert fp32.plan is not None
        fixed = fp32.plan
        w32 = fp32.stats.kind_bytes("host->device", "W")
        with _traffic_trainer("bf16", plan=fixed) as bf16:
            plan = bf16.plan
            assert plan is not None and plan.bounds == fixed.bounds
            assert all(loc is Loc.HOST for loc in plan.placement.w)
            w16 = bf16.stats.kind_bytes("host->device", "W")
            loads = plan.schedule.weight_loads()
            assert w16 / 2 == sum(loads[p] * plan.sizes.w[p] for p in loads)
            assert w16 / 2 == plan.predicted.bytes_by_kind[("host->device", "W")]
            assert 0.5 * w32 <= w16 <= 0.55 * w32, (w16, w32)
            assert bf16._runtime is not None
            packs = bf16._runtime.packs
            entries = [e for p in packs for e in p.layout.trainable]  # (params are away)
            params = sum(e.shape.numel() for e in entries)
            masters = sum(p.layout.g_bytes for p in packs)
            assert params * 4 <= masters < params * 4 + 256 * len(entries)
            for p, pack in enumerate(packs):
                momentum = sum(t.numel() * t.element_size() for s in pack.optimizer.state.values()
                               for t in s.values() if isinstance(t, torch.Tensor))
                assert momentum > 0 and pack.k_charged == momentum
                # K predicted = masters + optimizer state, both fp32
                assert plan.sizes.k[p] >= pack.layout.g_bytes + momentum
                assert all(m.dtype == torch.float32 for m in pack.masters)
            # between steps the host holds each pack's W (bf16), masters and optimizer state
            host = bf16.tiers[Loc.HOST]
            assert host.used == sum(p.layout.w_bytes + p.layout.g_bytes + p.k_charged
                                    for p in packs)


@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_bf16_accounted_peaks_within_budget_and_prediction(schedule: str) -> None:
    factory, loss_fn, data = MODELS["transformer"]
    budget = training_state_bytes(factory(0.0), 4) // 4
    trainer = harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                              device_memory=budget, precision="bf16", schedule=schedule)
    with trainer as t:
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            t.step(*data(6, g))
        plan = t.plan
        assert plan is not None and Loc.HOST in plan.placement.w
        predicted = plan.predicted.peak
        assert t.stats.peak_bytes["device"] <= budget
        assert t.stats.peak_bytes["device"] >= 0.95 * predicted[Loc.DEVICE]
        assert abs(t.stats.peak_bytes["host"] - predicted[Loc.HOST]) <= 0.05 * predicted[Loc.HOST]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_meta_bf16_profile_equals_measured(name: str) -> None:
    """Meta profiles stand in for autocast; their bytes equal a real bf16 profile's."""
    from harmony.builtin_models import build
    from harmony.chain import Chain
    from harmony.layout import Layout
    from harmony.meta import profile_on_meta
    from harmony.profile import profile_layers

    bf16 = Precision("bf16")
    with torch.device("meta"):
        meta = profile_on_meta(build(name), 2, precision="bf16")
    torch.manual_seed(0)
    spec = build(name)
    chain = Chain(spec.model)
    x, y = spec.example_inputs(2)
    real = profile_layers(chain, [Layout([m], bf16.dtype_of) for m in chain.layers], (x,), y,
                          spec.loss_fn, torch.device("cpu"), bf16)
    fields = ("w_bytes", "g_bytes", "in_bytes", "in_grad_bytes", "out_bytes", "saved_bytes")
    for m, r in zip(meta.layers, real):
        assert {f: getattr(m, f) for f in fields} == {f: getattr(r, f) for f in fields}, m.name


def test_report_predicts_bytes_in_their_dtypes(capsys: pytest.CaptureFixture[str]) -> None:
    """bf16: W about half of fp32's, G the same (fp32), K = masters + optimizer state; the
    planner's sizes and the weights crossing the link follow."""
    from harmony.cli import main
    from harmony.report import load_profile, make_report

    p32, p16 = load_profile("gpt-tiny", 2), load_profile("gpt-tiny", 2, precision="bf16")
    assert p16.precision == "bf16" and p16.k_total == p32.k_total + 1
    w32 = sum(lp.w_bytes for lp in p32.layers)
    w16 = sum(lp.w_bytes for lp in p16.layers)
    assert 0.5 * w32 <= w16 <= 0.55 * w32
    assert [lp.g_bytes for lp in p16.layers] == [lp.g_bytes for lp in p32.layers]
    budget = 200 << 10
    r32, r16 = make_report(p32, 4, budget, None), make_report(p16, 4, budget, None)
    for r in (r32, r16):
        assert r.plan.predicted.peak[Loc.DEVICE] <= budget
        sizes = r.plan.sizes
        assert sizes.k == [math.ceil(r.profile.k_total * g) for g in sizes.g]
    assert sum(r16.plan.sizes.w) <= 0.55 * sum(r32.plan.sizes.w)
    assert r16.arithmetic["host->device"] < r32.arithmetic["host->device"]
    assert main(["report", "gpt-tiny", "--batch-size", "4", "--micro-batch-size", "2",
                 "--precision", "bf16", "--device-memory", "200KiB"]) == 0
    out = capsys.readouterr().out
    assert "precision bf16" in out and "K = 3.00 x G" in out


def test_profiles_of_another_precision_are_refused() -> None:
    from harmony.report import load_profile

    with pytest.raises(ValueError, match="paper:gpt2-medium was profiled in fp32, not bf16"):
        load_profile("paper:gpt2-medium", 1, precision="bf16")
    with pytest.raises(ValueError, match="'fp8'"):
        load_profile("gpt-tiny", 1, precision="fp8")
