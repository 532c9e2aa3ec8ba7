"""Updates of NVMe-homed packs streamed through host memory in chunks (update_chunk=...):
exact against plain PyTorch, within a host budget smaller than one pack, as predicted."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import harmony
from harmony.planning.microbatch import micro_batch_sizes
from harmony.planning.planner import Plan, plan
from schedules.placement import Placement
from schedules.task import Loc
from tests.models import reference_train, tied_transformer

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
MBS = 2
CHUNK = 52 << 10  # one 64x64 Linear layer (weight and bias) with AdamW's state: 50.5 KiB


def stacks() -> nn.Sequential:
    """Three layers of six 64x64 Linear layers each, between an input and an output layer.
    With AdamW, one such layer's W + K is 293 KiB in twelve parameters."""
    torch.manual_seed(0)

    def stack() -> nn.Sequential:
        return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.Tanh())])

    return nn.Sequential(nn.Linear(16, 64), stack(), stack(), stack(), nn.Linear(64, 5))


LOSS = nn.functional.cross_entropy


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g))
            for _ in range(n)]


def adamw(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def adamw_fused(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)


def sgd(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def everything_on_nvme(model: Callable[[], nn.Module], opt: Factory, chunk: int | None,
                       precision: str = "fp32", loss: Callable = LOSS,
                       batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> Plan:
    """A plan with one layer per pack and every pack's W, K and X homed on NVMe, its updates
    streamed in chunks of ``chunk`` bytes."""
    x, y = batch if batch is not None else _batches(1)[0]
    with harmony.Trainer(model(), loss, optimizer=opt, micro_batch_size=MBS,
                         precision=precision) as probe:
        probe.step(x, y)  # (profiles the layers)
        profiles, k_ratio = probe.planner.profiles, probe.precision.k_ratio(probe.planner.k_ratio)
    assert profiles is not None
    n = len(profiles)
    return plan(profiles, "harmony", micro_batch_sizes(len(y), MBS), None, None, k_ratio,
                {"host->device": 1e9, "device->host": 1e9}, nvme=True, update_chunk=chunk,
                fixed=(tuple((i, i + 1) for i in range(n)), Placement.uniform(n, Loc.NVME)))


def _train(nvme: Path, given: Plan, opt: Factory, batches: list[tuple[torch.Tensor, ...]],
           model: Callable[[], nn.Module] = stacks, **kwargs: object) -> harmony.Trainer:
    t = harmony.Trainer(model(), kwargs.pop("loss", LOSS), optimizer=opt,  # type: ignore[arg-type]
                        micro_batch_size=MBS, nvme_dir=nvme, plan=given, **kwargs)  # type: ignore[arg-type]
    for b in batches:
        t.step(*b)
    return t


def _chunks(t: harmony.Trainer) -> list[int]:
    assert t.runtime is not None
    return [len(p.chunks) for p in t.runtime.packs]


@pytest.mark.parametrize("opt", [adamw, adamw_fused, sgd])
def test_chunked_update_equals_pytorch(tmp_path: Path, opt: Factory) -> None:
    batches = _batches()
    with _train(tmp_path, everything_on_nvme(stacks, opt, CHUNK), opt, batches) as t:
        assert t.plan is not None and t.plan.update_chunk == CHUNK
        assert set(t.plan.placement.w) == set(t.plan.placement.x) == {Loc.NVME}
        assert _chunks(t)[1:4] == [6, 6, 6]  # one chunk per Linear layer of the stacks
        assert t.stats.kind_bytes("device->nvme", "X") > 0
        got = t.state_dict()
    want = reference_train(stacks(), LOSS, opt, batches, MBS)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _cpu_adam() -> Factory:
    from harmony.training.optim import deepspeed_cpu_adam

    return deepspeed_cpu_adam(lr=1e-2)


def _cpu_adam_built() -> bool:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache/torch_extensions"))
    return any(root.glob("**/cpu_adam*.so"))


@pytest.mark.parametrize("precision,opt", [
    ("bf16", adamw),
    pytest.param("fp32", "cpu_adam", marks=pytest.mark.skipif(
        not _cpu_adam_built(), reason="DeepSpeed's CPU Adam op is not built (.ci/run builds "
        "it; building here would take minutes)"))])
def test_chunked_equals_unchunked(tmp_path: Path, precision: str, opt: Factory | str) -> None:
    """Mixed precision (the fp32 masters in their own chunk files) and DeepSpeed's CPU Adam
    (which rounds otherwise than torch): chunks of one update change no bit."""
    make = _cpu_adam() if opt == "cpu_adam" else opt
    assert callable(make)
    batches = _batches()
    given = everything_on_nvme(stacks, make, CHUNK, precision)
    runs = []
    for chunk in (CHUNK, None):
        (tmp_path / str(chunk)).mkdir()
        with _train(tmp_path / str(chunk), given, make, batches, precision=precision,
                    update_chunk=chunk) as t:
            assert all(n >= 6 if chunk else n == 1 for n in _chunks(t)[1:4])
            runs.append(t.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for k in runs[1]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    start = stacks().state_dict()
    assert any(not torch.equal(runs[0][k], start[k]) for k in start)  # it trained


def test_tied_weights_chunked_equal_unchunked(tmp_path: Path) -> None:
    """The head's copy of the tied embedding (in one chunk file of the head's pack) is
    refreshed after the owner's chunk holding the master is stepped."""
    g = torch.Generator().manual_seed(3)
    batches = [(x, x.roll(-1, 1)) for x in (torch.randint(0, 11, (4, 8), generator=g)
                                           for _ in range(3))]

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return LOSS(logits.flatten(0, 1), targets.flatten())

    given = everything_on_nvme(tied_transformer, adamw, 8 << 10, loss=loss, batch=batches[0])
    runs = []
    for chunk in (8 << 10, None):
        (tmp_path / str(chunk)).mkdir()
        with _train(tmp_path / str(chunk), given, adamw, batches, tied_transformer,
                    loss=loss, update_chunk=chunk) as t:
            assert (max(_chunks(t)) > 1) == (chunk is not None)
            runs.append(t.state_dict())
    for k in runs[1]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    assert torch.equal(runs[0]["head.out.weight"], runs[0]["embed.tok.weight"])


def test_checkpoint_of_a_chunked_run_resumes_exactly(tmp_path: Path) -> None:
    batches = _batches(4)
    given = everything_on_nvme(stacks, adamw, CHUNK)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with _train(tmp_path / "a", given, adamw, batches) as straight:
        want = straight.state_dict()
    with _train(tmp_path / "b", given, adamw, batches[:2]) as first:
        first.save(tmp_path / "ckpt")
    # into a chunked trainer, and into one updating whole packs (the files are laid out anew)
    for chunk in (CHUNK, None):
        with _train(tmp_path / "c", given, adamw, [], update_chunk=chunk) as resumed:
            resumed.load(tmp_path / "ckpt")
            for b in batches[2:]:
                resumed.step(*b)
            got = resumed.state_dict()
        for k in want:
            assert torch.equal(got[k], want[k]), (chunk, k)


def test_host_budget_smaller_than_one_pack(tmp_path: Path) -> None:
    """A host budget below one pack's W + K: the whole-pack update cannot fit, the planner
    streams it in chunks, the accounted host bytes stay within the budget and match the
    prediction, and training stays exact."""
    host = 260 << 10
    batches = _batches()
    kwargs = {"device_memory": 400 << 10, "host_memory": host, "nvme_dir": tmp_path}
    with harmony.Trainer(stacks(), LOSS, optimizer=adamw, micro_batch_size=MBS,
                         **kwargs) as t:  # type: ignore[arg-type]
        for b in batches:
            t.step(*b)
        assert t.plan is not None and t.plan.update_chunk is not None
        assert t.runtime is not None
        nvme = [p for p in t.runtime.packs if p.home is Loc.NVME]
        assert nvme and all(len(p.chunks) >= 4 for p in nvme if p.layout.w_bytes > 64 << 10)
        whole = max(p.layout.w_bytes + p.k_bytes for p in nvme)
        assert host < whole  # the update of one pack at once would not fit
        peak = t.stats.peak_bytes["host"]
        assert peak <= host
        predicted = t.plan.predicted.peak[Loc.HOST]
        assert abs(peak - predicted) <= 0.05 * predicted, (peak, predicted)
        assert t.stats.peak_bytes["device"] <= 400 << 10
        got = t.state_dict()
    want = reference_train(stacks(), LOSS, adamw, batches, MBS)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with harmony.Trainer(stacks(), LOSS, optimizer=adamw, micro_batch_size=MBS,
                         update_chunk=None, **kwargs) as whole_packs,  \
            pytest.raises(harmony.InfeasiblePlan, match="host_memory=260.00KiB is too small"):
        whole_packs.step(*batches[0])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -4096, "lots", "-1MiB", True, [1 << 20]])
def test_bad_update_chunk_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"update_chunk=.* positive number of bytes"):
        harmony.Trainer(stacks(), LOSS, update_chunk=bad)  # type: ignore[arg-type]
