"""Models built on the meta device, given their values one layer (or tensor) at a time:
``Trainer(init=...)`` and ``Trainer(weights=...)`` (harmony/model/materialize.py,
harmony/io/weights.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import harmony
from harmony.io.weights import WeightsError
from harmony.model.materialize import Materializer
from tests.models import (
    MODELS,
    TinyTransformer,
    reference_train,
    tied_transformer,
    training_state_bytes,
)
from tests.timing import fix_timing

LOSS = MODELS["transformer"][1]

PLACEMENTS = {
    "device": {},
    "host": {"device_memory": "200KiB"},
    "nvme": {"device_memory": "200KiB", "host_memory": "400KiB", "nvme": True},
    "nvme, chunked": {"device_memory": "200KiB", "host_memory": "400KiB", "nvme": True,
                      "update_chunk": "16KiB"},
}


def _adamw(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [MODELS["transformer"][2](6, g) for _ in range(n)]


def _trainer(model: nn.Module, tmp_path: Path, placement: str, **kw: object) -> harmony.Trainer:
    opts = dict(PLACEMENTS[placement])
    if opts.pop("nvme", False):
        (tmp_path / "nvme").mkdir(exist_ok=True)
        opts["nvme_dir"] = str(tmp_path / "nvme")
    return harmony.Trainer(model, LOSS, optimizer=_adamw, micro_batch_size=2,
                           **opts, **kw)  # type: ignore[arg-type]


def _train(t: harmony.Trainer, batches: list[tuple[torch.Tensor, torch.Tensor]],
           ) -> dict[str, torch.Tensor]:
    with t:
        for x, y in batches:
            t.step(x, y)
        return t.state_dict()


def _saved(model: nn.Module, path: Path, drop: tuple[str, ...] = ()) -> Path:
    """The model's weights as one safetensors file (without the keys ``drop``: a tied
    weight's second key, as Hugging Face saves it)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in drop}
    save_file(sd, path)
    return path


def _meta(factory: type[nn.Module] | object) -> nn.Module:
    with torch.device("meta"):
        return factory()  # type: ignore[operator]


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_meta_model_with_weights_trains_bitwise_like_plain_pytorch(
        tmp_path: Path, placement: str) -> None:
    batches = _batches()
    path = _saved(TinyTransformer(), tmp_path / "w.safetensors")
    want = reference_train(TinyTransformer(), LOSS, _adamw, batches, 2)
    got = _train(_trainer(_meta(TinyTransformer), tmp_path, placement, weights=path), batches)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("placement", ["host", "nvme, chunked"])
def test_tied_meta_model_with_weights_trains_like_the_built_one(
        tmp_path: Path, placement: str) -> None:
    """The file holds the tied weight once (as Hugging Face saves it); the copy a later pack
    computes with takes the master's value."""
    batches = _batches()
    path = _saved(tied_transformer(), tmp_path / "w.safetensors", drop=("head.out.weight",))
    want = _train(_trainer(tied_transformer(), tmp_path, placement), batches)
    got = _train(_trainer(_meta(tied_transformer), tmp_path, placement, weights=path),
                 batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_bf16_meta_model_with_weights_trains_like_the_built_one(tmp_path: Path) -> None:
    batches = _batches(2)
    path = _saved(TinyTransformer(), tmp_path / "w.safetensors")
    want = _train(_trainer(TinyTransformer(), tmp_path, "nvme", precision="bf16"), batches)
    got = _train(_trainer(_meta(TinyTransformer), tmp_path, "nvme", precision="bf16",
                          weights=path), batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_weights_from_shards_and_from_a_checkpoint(tmp_path: Path) -> None:
    batches = _batches(2)
    model = TinyTransformer()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(sd)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, shards / name)
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    with _trainer(_meta(TinyTransformer), tmp_path, "host", weights=shards) as t:
        before = t.state_dict()  # (read from the files, nothing built yet)
        t.step(*batches[0])
        t.save(tmp_path / "ckpt")
        after = t.state_dict()
    for k in sd:
        assert torch.equal(before[k], sd[k]), k
    with _trainer(_meta(TinyTransformer), tmp_path, "nvme", weights=tmp_path / "ckpt") as t:
        loaded = t.state_dict()
    for k in after:
        assert torch.equal(loaded[k], after[k]), k


def test_init_is_each_modules_reset_parameters_under_the_layers_seed(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16))
    t = harmony.Trainer(model, nn.functional.mse_loss, seed=5,
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0, momentum=0.9),
                        device_memory="80KiB", host_memory="100KiB", nvme_dir=str(tmp_path),
                        update_chunk="8KiB")
    with t:
        before = t.state_dict()  # materialized layer by layer, nothing built yet
        t.step(torch.randn(4, 64), torch.randn(4, 16))  # profile, packs on NVMe, lr 0
        assert t.plan is not None and "nvme" in t.plan.placement.to_json()["w"]
        after = t.state_dict()
    seed = Materializer(harmony.model.chain.Chain(nn.Sequential(nn.Linear(1, 1))), seed=5)
    for i, shape in ((0, (64, 128)), (2, (128, 16))):
        torch.manual_seed(seed._layer_seed(i))
        want = nn.Linear(*shape)  # (the constructor runs reset_parameters())
        for name in ("weight", "bias"):
            assert torch.equal(before[f"{i}.{name}"], getattr(want, name).detach())
    for k in before:  # the profile, the packs and state_dict() materialized it alike
        assert torch.equal(after[k], before[k]), k


def test_init_values_do_not_depend_on_the_plan(tmp_path: Path) -> None:
    batches = _batches(2)
    a = _train(_trainer(_meta(TinyTransformer), tmp_path, "device"), batches)
    b = _train(_trainer(_meta(TinyTransformer), tmp_path, "nvme, chunked"), batches)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_one_layer_materialized_at_a_time(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    live, most = [0], [0]
    real = Materializer.layer

    def counting(self: Materializer, i: int):  # type: ignore[no-untyped-def]
        cm = real(self, i)

        class Counted:
            def __enter__(self) -> None:
                cm.__enter__()
                live[0] += 1
                most[0] = max(most[0], live[0])

            def __exit__(self, *exc: object) -> None:
                live[0] -= 1
                cm.__exit__(*exc)

        return Counted()

    monkeypatch.setattr(Materializer, "layer", counting)
    _train(_trainer(_meta(TinyTransformer), tmp_path, "nvme, chunked"), _batches(1))
    assert most[0] == 1


class Scale(nn.Module):
    """A parameter of its own and no reset_parameters(): the default init cannot set it."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class Rotary(nn.Module):
    """A buffer computed in __init__ and saved nowhere (non-persistent)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("freq", torch.arange(4.0) + 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.freq


def test_what_the_default_init_cannot_set_is_refused_by_name() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(ValueError, match=r"1 \(Scale: s\).*init="):
        harmony.Trainer(model, nn.functional.mse_loss)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Scale())
    t = harmony.Trainer(model, nn.functional.mse_loss,
                        init=lambda layer: nn.init.ones_(layer.s) if isinstance(layer, Scale)
                        else layer.reset_parameters())
    with t:
        t.step(torch.randn(2, 4), torch.randn(2, 4))


def test_an_init_that_leaves_a_tensor_unset_is_refused_by_name() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    t = harmony.Trainer(model, nn.functional.mse_loss,
                        init=lambda layer: nn.init.zeros_(layer.weight))
    with t, pytest.raises(ValueError, match=r"layer 0 .*'0.bias'.*init="):
        t.step(torch.randn(2, 4), torch.randn(2, 4))


def test_buffers_computed_in_init_stay_real_under_empty_weights() -> None:
    with torch.device("meta"):
        model = nn.Sequential(Rotary())
    with pytest.raises(ValueError, match=r"0 \(Rotary: freq\).*empty_weights"):
        harmony.Trainer(model, nn.functional.mse_loss)
    with harmony.empty_weights():
        model = nn.Sequential(Rotary())
    assert model[0].lin.weight.is_meta and not model[0].freq.is_meta
    with harmony.Trainer(model, nn.functional.mse_loss) as t:
        t.step(torch.randn(2, 4), torch.randn(2, 4))
        assert torch.equal(model[0].freq, torch.arange(4.0) + 1)  # (at its home on the device)
        assert not torch.isnan(t.state_dict()["0.lin.weight"]).any()


def test_bad_init_and_weights_arguments_are_refused(tmp_path: Path) -> None:
    path = _saved(TinyTransformer(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="init= initializes a model built on the meta"):
        harmony.Trainer(TinyTransformer(), LOSS, init=lambda layer: None)
    with pytest.raises(ValueError, match="init= and weights= both"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, init=lambda layer: None, weights=path)
    with pytest.raises(ValueError, match="init=3 is not callable"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, init=3)  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="does not exist"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, weights=tmp_path / "nowhere")
    sd = load_file(path)
    save_file({k: v for k, v in sd.items() if k != "head.ln.bias"}, tmp_path / "less.st")
    with pytest.raises(WeightsError, match=r"no value for \['head.ln.bias'\]"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, weights=tmp_path / "less.st")
    save_file({**sd, "head.out.bias": torch.zeros(3)}, tmp_path / "other.st")
    with pytest.raises(WeightsError, match=r"head.out.bias is \(3,\) there, \(11,\) here"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, weights=tmp_path / "other.st")
    (tmp_path / "junk.st").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, weights=tmp_path / "junk.st")


def test_a_corrupted_checkpoint_is_refused_as_weights(tmp_path: Path) -> None:
    with _trainer(TinyTransformer(), tmp_path, "device") as t:
        saved = t.save(tmp_path / "ckpt")
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        harmony.Trainer(_meta(TinyTransformer), LOSS, weights=tmp_path / "ckpt")


def test_a_checkpoint_loaded_before_the_first_step_gives_a_meta_model_its_values(
        tmp_path: Path) -> None:
    batches = _batches(3)
    with _trainer(TinyTransformer(), tmp_path, "host") as t:
        t.step(*batches[0])
        t.save(tmp_path / "ckpt")
        t.step(*batches[1])
        t.step(*batches[2])
        want = t.state_dict()
    with _trainer(_meta(TinyTransformer), tmp_path, "nvme, chunked") as t:
        t.load(tmp_path / "ckpt")  # nothing built yet: the packs are filled from it
        assert t.step_count == 1
        t.step(*batches[1])
        t.step(*batches[2])
        got = t.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_re_plan_keeps_the_trained_weights_not_the_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Longer sequences re-home the training state to new packs: what they are filled with
    is the trained weights, not the file the model was first read from."""
    fix_timing(monkeypatch.setattr)
    rehomed: list[int] = []
    original = harmony.Trainer._rehome

    def spy(self: harmony.Trainer, *args: object) -> object:
        rehomed.append(self.step_count)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(harmony.Trainer, "_rehome", spy)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randint(0, 11, (4, n), generator=g) for n in (4, 4, 16, 8)]
    batches = [(x, x.roll(-1, 1)) for x in xs]
    path = _saved(TinyTransformer(length=16), tmp_path / "w.safetensors")
    state = training_state_bytes(TinyTransformer(length=16), 8)
    runs = []
    for kw in ({}, {"weights": path}):
        model = _meta(lambda: TinyTransformer(length=16)) if kw else TinyTransformer(length=16)
        (tmp_path / "nvme").mkdir(exist_ok=True)
        with harmony.Trainer(model, LOSS, optimizer=_adamw, micro_batch_size=2,
                             device_memory=state // 3, host_memory=state // 2,
                             nvme_dir=tmp_path / "nvme", **kw) as t:  # type: ignore[arg-type]
            for x, y in batches:
                t.step(x, y)
            runs.append(t.state_dict())
    assert len(rehomed) == 2  # (one re-plan in each run)
    for k in runs[0]:
        assert torch.equal(runs[1][k], runs[0][k]), k
