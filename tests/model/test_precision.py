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

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from harmony.model.precision import Precision
from schedules.task import Loc
from tests.models import MODELS, layers_of, training_state_bytes

STEPS = 20


def _sgd(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def _batches(model: str, steps: int = STEPS, n: int = 6) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [MODELS[model][2](n, g) for _ in range(steps)]


def _reference(model: str, batches: list[tuple[torch.Tensor, ...]], mbs: int,
               dtype: torch.dtype | None, make_opt: Callable = _sgd, clip: float | None = None,
               lr_scheduler: Callable | None = None, device: str = "cpu",
               ) -> dict[str, torch.Tensor]:
    """Plain PyTorch, fp32 parameters, gradient accumulation; forward and loss under
    ``torch.autocast(device_type=device, dtype=dtype)`` (None: plain fp32); optionally
    ``clip_grad_norm_`` before each step and a learning-rate scheduler after it."""
    factory, loss_fn, _ = MODELS[model]
    net = factory(0.0).to(device)
    layers = layers_of(net)
    opt = make_opt(list(net.parameters()))
    scheduler = lr_scheduler(opt) if lr_scheduler is not None else None
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            with (torch.autocast(device, dtype=dtype) if dtype is not None
                  else contextlib.nullcontext()):
                h: object = xm
                for layer in layers:
                    h = layer(*h) if isinstance(h, tuple) else layer(h)
                loss = loss_fn(h, ym) * (ym.shape[0] / y.shape[0])
            loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b
                     if b[k].is_floating_point()) ** 0.5)


def _check_tracks_autocast(model: str, got: dict[str, torch.Tensor],
                           batches: list[tuple[torch.Tensor, ...]], mbs: int,
                           dtype: torch.dtype = torch.bfloat16, **kw: object) -> None:
    init = MODELS[model][0](0.0).state_dict()
    want = _reference(model, batches, mbs, dtype, **kw)  # type: ignore[arg-type]
    fp32 = _reference(model, batches, mbs, None, **kw)  # type: ignore[arg-type]
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


@pytest.mark.parametrize("model,schedule", [("mlp", "harmony"), ("transformer", "harmony"),
                                            ("transformer", "resident")])
def test_bf16_on_device_tracks_autocast(model: str, schedule: str) -> None:
    batches = _batches(model)
    trainer, got = _train(model, batches, 2, precision="bf16", schedule=schedule)
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
        assert trainer.runtime is not None and trainer.store is not None
        assert all(trainer.runtime.packs[p].key("M", 0) in trainer.store for p in on_nvme)
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
            assert Loc.HOST in plan.placement.w
            w16 = bf16.stats.kind_bytes("host->device", "W")
            loads = plan.schedule.weight_loads()
            assert w16 / 2 == sum(loads[p] * plan.sizes.w[p] for p in loads)
            assert w16 / 2 == plan.predicted.bytes_by_kind[("host->device", "W")]
            assert 0.5 * w32 <= w16 <= 0.55 * w32, (w16, w32)
            assert bf16.runtime is not None
            packs = bf16.runtime.packs
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
            host.drain()  # releases that wait for copies still in flight
            assert host.used == sum(p.layout.w_bytes + p.layout.g_bytes + p.k_charged
                                    for p in packs if p.home is Loc.HOST)


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
    from harmony.model.chain import Chain
    from harmony.model.layout import Layout
    from harmony.planning.meta import profile_on_meta
    from harmony.planning.profile import profile_layers
    from harmony.tools.builtin_models import build

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
    from harmony.tools.cli import main
    from harmony.tools.report import load_profile, make_report

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
    from harmony.tools.report import load_profile

    with pytest.raises(ValueError, match="paper:gpt2-medium was profiled in fp32, not bf16"):
        load_profile("paper:gpt2-medium", 1, precision="bf16")
    with pytest.raises(ValueError, match="'fp8'"):
        load_profile("gpt-tiny", 1, precision="fp8")


def _step_lr(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_clipping_and_lr_scheduler_track_autocast(precision: str, dtype: torch.dtype) -> None:
    """The clipping norm is taken over the fp32 gradients (unscaled, in fp16), and the
    scheduler drives the masters' optimizer: both as plain PyTorch under autocast. The limit
    is low enough that most steps clip."""
    model = "transformer"
    batches = _batches(model)
    budget = training_state_bytes(MODELS[model][0](0.0), 4) // 4
    trainer, got = _train(model, batches, 2, precision=precision, device_memory=budget,
                          clip_grad_norm=0.5, lr_scheduler=_step_lr)
    with trainer:
        assert trainer.stats.skipped_steps == 0
        assert trainer.runtime is not None and trainer.runtime.grad_norm > 0.5
        _check_tracks_autocast(model, got, batches, 2, dtype, clip=0.5, lr_scheduler=_step_lr)


def test_fp16_overflow_skips_the_step_and_backs_off() -> None:
    """A loss scale so large that the fp16 gradients overflow: the step changes no weight
    and no optimizer state, counts as skipped, and halves the scale until steps succeed."""
    batches = _batches("mlp", steps=30)
    precision = Precision("fp16", init_scale=2.0 ** 40, growth_interval=1000)
    factory, loss_fn, _ = MODELS["mlp"]
    budget = training_state_bytes(factory(0.0), 4) // 4
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                         device_memory=budget, precision=precision) as t:
        before = t.state_dict()
        loss = t.step(*batches[0])
        assert loss == loss and t.stats.skipped_steps == 1 and t.step_count == 0
        assert t.precision.scale == 2.0 ** 39 and precision.scale == 2.0 ** 40  # a copy
        after = t.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert t.optimizer_state()[0] == {}  # no momentum was created
        def used() -> dict[Loc, int]:
            for tier in t.tiers.values():
                tier.drain()  # releases that wait for copies still in flight
            return {loc: tier.used for loc, tier in t.tiers.items()}

        held = used()
        skipped = 1
        for x, y in batches[1:]:
            t.step(x, y)
            if t.step_count:
                break
            skipped += 1
            # a skipped step drops its gradients and activations: nothing stays charged
            assert used() == held
        assert t.step_count == 1 and t.stats.skipped_steps == skipped
        assert t.precision.scale == 2.0 ** (40 - skipped)
        assert any(not torch.equal(before[k], v) for k, v in t.state_dict().items())


def test_fp16_scale_grows_after_the_interval() -> None:
    batches = _batches("mlp", steps=5)
    precision = Precision("fp16", init_scale=256.0, growth_interval=2)
    factory, loss_fn, _ = MODELS["mlp"]
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                         precision=precision) as t:
        scales = []
        for x, y in batches:
            t.step(x, y)
            scales.append(t.precision.scale)
        assert t.stats.skipped_steps == 0
        assert scales == [256.0, 512.0, 512.0, 1024.0, 1024.0]


def test_fp16_tracks_autocast() -> None:
    model = "transformer"
    batches = _batches(model)
    trainer, got = _train(model, batches, 2, precision="fp16")
    with trainer:
        assert trainer.stats.skipped_steps == 0
        _check_tracks_autocast(model, got, batches, 2, torch.float16)


@pytest.mark.parametrize("precision,nvme", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_checkpoint_round_trip(tmp_path: Path, precision: str, nvme: bool) -> None:
    """save() holds the fp32 masters (model keys and dtypes) and the loss scale; a fresh
    trainer that loads it, and the trainer itself rewound to it, continue exactly as the
    uninterrupted run (with NVMe homes: masters and W files rewritten)."""
    model = "transformer"
    batches = _batches(model, steps=6)
    factory, loss_fn, _ = MODELS[model]
    state = training_state_bytes(factory(0.0), 4)

    def make() -> harmony.Trainer:
        (tmp_path / "nvme").mkdir(exist_ok=True)
        return harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, micro_batch_size=2,
                               device_memory=state // 4,
                               host_memory=state // 2 if nvme else None,
                               nvme_dir=str(tmp_path / "nvme") if nvme else None,
                               precision=Precision(precision, init_scale=512.0,
                                                   growth_interval=2))

    with make() as a:
        for b in batches[:3]:
            a.step(*b)
        assert a.plan is not None and (Loc.NVME in a.plan.placement.w) == nvme
        a.save(tmp_path / "ckpt")
        a.export(tmp_path / "export")
        saved = a.state_dict()
        scale = a.precision.scale
        for b in batches[3:]:
            a.step(*b)
        want = a.state_dict()
        assert a.precision.scale != scale or precision == "bf16"
        a.load(tmp_path / "ckpt")  # rewind the trained packs
        assert a.precision.scale == scale
        assert all(torch.equal(a.state_dict()[k], saved[k]) for k in saved)
        for b in batches[3:]:
            a.step(*b)
        again = a.state_dict()
        assert all(torch.equal(again[k], want[k]) for k in want)
    init = factory(0.0).state_dict()
    assert all(saved[k].dtype == init[k].dtype for k in init)
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    with make() as b:
        b.load(tmp_path / "ckpt")
        assert b.precision.scale == scale and b.step_count == 3
        assert all(torch.equal(b.state_dict()[k], saved[k]) for k in saved)
        for x in batches[3:]:
            b.step(*x)
        got = b.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("value", ["fp8", "float16", "BF16", "", None, 16, torch.bfloat16])
def test_unknown_precision_names_the_value_and_choices(value: object) -> None:
    with pytest.raises(ValueError, match=r"precision=.*is not supported; use one of 'fp32', "
                                         r"'bf16', 'fp16'"):
        harmony.Trainer(MODELS["mlp"][0](0.0), MODELS["mlp"][1],
                        precision=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw,match", [({"init_scale": 0.0}, "init_scale=0.0"),
                                      ({"init_scale": float("inf")}, "init_scale=inf"),
                                      ({"growth_factor": 1.0}, "growth_factor=1.0"),
                                      ({"backoff_factor": 1.5}, "backoff_factor=1.5"),
                                      ({"growth_interval": 0}, "growth_interval=0")])
def test_bad_loss_scaling_settings(kw: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Precision("fp16", **kw)  # type: ignore[arg-type]


def test_unsupported_compute_dtype_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without autocast for the dtype on this device: a ValueError naming both."""
    def broken(self: Precision, device: torch.device) -> object:
        raise RuntimeError("no fp16 kernels here")

    monkeypatch.setattr(Precision, "autocast", broken)
    with pytest.raises(ValueError, match=r"precision='fp16' is not supported on cpu .*no fp16 "
                                         r"kernels.*use precision='fp32' or bf16"):
        harmony.Trainer(MODELS["mlp"][0](0.0), MODELS["mlp"][1], precision="fp16")


def test_checkpoints_load_across_precisions(tmp_path: Path) -> None:
    """Checkpoints hold fp32 masters, so any precision loads any other's weights; an fp16
    trainer loading a bf16 checkpoint keeps its own loss scale."""
    factory, loss_fn, _ = MODELS["mlp"]
    batches = _batches("mlp", steps=2)
    with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, precision="bf16") as a:
        for b in batches:
            a.step(*b)
        a.save(tmp_path)
        saved = a.state_dict()
    for precision in ("fp16", "fp32"):
        scaling = Precision(precision, init_scale=1024.0)
        with harmony.Trainer(factory(0.0), loss_fn, optimizer=_sgd, precision=scaling) as c:
            c.step(*batches[0])
            c.load(tmp_path)
            assert all(torch.equal(c.state_dict()[k], saved[k]) for k in saved)
            assert c.step_count == 2
            assert c.precision.scale == (1024.0 if precision == "fp16" else 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_cuda_swapping_tracks_autocast(precision: str, dtype: torch.dtype) -> None:
    """On a GPU: W swapped in the low dtype, budgets held by the accounting and by the
    allocator (plus the allowance test_cuda.py states), weights tracking autocast on CUDA."""
    model = "transformer"
    batches = _batches(model)
    budget = training_state_bytes(MODELS[model][0](0.0), 4) // 4
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    trainer, got = _train(model, batches, 2, device="cuda", device_memory=budget,
                          precision=Precision(precision, init_scale=256.0))
    with trainer:
        plan = trainer.plan
        assert plan is not None and Loc.HOST in plan.placement.w
        assert trainer.stats.skipped_steps == 0
        assert trainer.stats.peak_bytes["device"] <= budget
        assert torch.cuda.max_memory_allocated() - base <= budget + (4 << 20)
        _check_tracks_autocast(model, got, batches, 2, dtype, device="cuda")
