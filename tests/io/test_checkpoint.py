"""save/load: resuming continues exactly as an uninterrupted run; bad checkpoints are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import harmony
from tests.fs import tmpfs
from tests.models import MODELS, training_state_bytes


def _opt(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _trainer(model: str = "transformer", budget: str = "half", dropout: float = 0.2,
             ) -> harmony.Trainer:
    factory, loss_fn, _ = MODELS[model]
    limit = training_state_bytes(factory(0.0), 8) // 2 if budget == "half" else None
    return harmony.Trainer(factory(dropout), loss_fn, optimizer=_opt, micro_batch_size=2,
                           device_memory=limit)


def _batches(model: str = "transformer", n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    return [MODELS[model][2](5, g) for _ in range(n)]


@pytest.mark.parametrize("budget", ["none", "half"])
@pytest.mark.parametrize("save_before_first_step", [False, True])
def test_resume_is_bitwise_equal(tmp_path: Path, budget: str, save_before_first_step: bool,
                                 ) -> None:
    batches = _batches()
    with _trainer(budget=budget) as straight:
        for b in batches:
            straight.step(*b)
        want = straight.state_dict()
    k = 0 if save_before_first_step else 2
    with _trainer(budget=budget) as first:
        for b in batches[:k]:
            first.step(*b)
        first.save(tmp_path / "ckpt")
    torch.manual_seed(123)  # the resumed model starts from other weights: load must overwrite
    factory, loss_fn, _ = MODELS["transformer"]
    other = factory(0.2)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    limit = training_state_bytes(factory(0.0), 8) // 2 if budget == "half" else None
    with harmony.Trainer(other, loss_fn, optimizer=_opt, micro_batch_size=2,
                         device_memory=limit) as resumed:
        resumed.load(tmp_path / "ckpt")
        assert resumed.step_count == k
        for b in batches[k:]:
            resumed.step(*b)
        got = resumed.state_dict()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_files_private_and_previous_replaced(tmp_path: Path) -> None:
    with _trainer() as t:
        t.step(*_batches()[0])
        first = t.save(tmp_path)
        t.step(*_batches()[1])
        second = t.save(tmp_path)
    assert not first.exists() and second.exists()
    assert (tmp_path / "LATEST").read_text().strip() == second.name
    assert stat.S_IMODE((tmp_path / "LATEST").stat().st_mode) == 0o600
    for f in second.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(second.stat().st_mode) == 0o700


def test_corrupted_and_truncated_files_refused(tmp_path: Path) -> None:
    with _trainer() as t:
        t.step(*_batches()[0])
        ckpt = t.save(tmp_path)
        before = t.state_dict()
        f = ckpt / "optimizer.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        with pytest.raises(harmony.CheckpointError, match="optimizer.safetensors.*truncated"):
            t.load(tmp_path)
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(harmony.CheckpointError, match="corrupted"):
            t.load(tmp_path)
        after = t.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_pickle_payload_refused(tmp_path: Path) -> None:
    with _trainer() as t:
        ckpt = t.save(tmp_path)
        torch.save({"x": torch.zeros(1)}, ckpt / "model.safetensors")  # a pickle, not tensors
        with pytest.raises(harmony.CheckpointError):
            t.load(tmp_path)


def test_checkpoint_of_another_model_refused(tmp_path: Path) -> None:
    with _trainer("mlp") as t:
        t.save(tmp_path)
    with _trainer("transformer") as other, pytest.raises(harmony.CheckpointError,
                                                         match="another model"):
        other.load(tmp_path)


def test_incomplete_checkpoint_ignored_with_warning(tmp_path: Path) -> None:
    with _trainer() as t:
        t.step(*_batches()[0])
        t.save(tmp_path)
        want = t.state_dict()
    (tmp_path / "LATEST").unlink()  # as if the crash came between rename and pointer
    (tmp_path / "ckpt-000000099").mkdir()  # a newer one that never got its meta.json
    with _trainer() as t2:
        with pytest.warns(UserWarning, match="incomplete"):
            t2.load(tmp_path)
        got = t2.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with _trainer() as t, pytest.raises(FileNotFoundError):
        t.load(tmp_path / "nothing")


def test_save_to_unwritable_place_keeps_previous(tmp_path: Path) -> None:
    with _trainer() as t:
        t.save(tmp_path / "ok")
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(OSError):
            t.save(blocker / "sub")
    assert (tmp_path / "ok" / "LATEST").is_file()
    assert os.listdir(tmp_path / "ok")


def test_full_disk_during_save_keeps_previous(tmp_path: Path) -> None:
    """A checkpoint directory on a filesystem that fills up mid-save: OSError, the previous
    checkpoint stays the one LATEST names and it loads intact."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    with tmpfs(tmp_path / "small", "size=2m") as small:
        with _trainer(budget="none") as t:
            t.step(*_batches()[0])
            first = t.save(small)
            want = t.state_dict()
            t.step(*_batches()[1])
            free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
            (small / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))
            with pytest.raises(OSError):
                t.save(small)
        assert (small / "LATEST").read_text().strip() == first.name
        assert not list(small.glob(".tmp-ckpt-*"))
        (small / "filler").unlink()
        with _trainer(budget="none") as fresh:
            fresh.load(small)
            got = fresh.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_export_plain_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    with _trainer() as t:
        t.step(*_batches()[0])
        out = t.export(tmp_path / "export")
        want = t.state_dict()
    got = load_file(out / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    factory, _, _ = MODELS["transformer"]
    plain = factory(0.0)
    plain.load_state_dict(got)  # loads into the plain model, strict


def test_export_hugging_face_model_loads_with_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (4, 8), generator=g)
    with harmony.Trainer(model, loss_fn, micro_batch_size=2) as t:
        t.step(x, torch.roll(x, -1, 1))
        out = t.export(tmp_path / "hf")
        want = t.state_dict()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    got = loaded.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_load_before_the_first_step_overrides_weights_files(tmp_path: Path) -> None:
    """Trainer(weights=file) then load(checkpoint) before any step: the packs take the
    checkpoint's values (not the file's), as state_dict() shows before and after building."""
    from safetensors.torch import save_file

    from tests.models import TinyTransformer, cross_entropy_tokens

    save_file({k: v.contiguous() for k, v in TinyTransformer(length=16).state_dict().items()},
              tmp_path / "w.safetensors")
    other = TinyTransformer(length=16)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    def still(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=0.0)  # (a step leaves the values as they are)

    with harmony.Trainer(other, cross_entropy_tokens, micro_batch_size=2, optimizer=still) as t:
        t.save(tmp_path / "ckpt")
        want = t.state_dict()
    with harmony.Trainer(TinyTransformer(length=16), cross_entropy_tokens, micro_batch_size=2,
                         weights=tmp_path / "w.safetensors", optimizer=still) as t:
        t.load(tmp_path / "ckpt")
        before = t.state_dict()
        x = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(0))
        t.step(x, x.roll(-1, 1))
        after = t.state_dict()
    for k in want:
        assert torch.equal(before[k], want[k]) and torch.equal(after[k], want[k]), k


def test_a_save_before_the_first_step_keeps_the_loaded_optimizer_state(tmp_path: Path) -> None:
    """load() then save() with no step between: the new checkpoint holds the optimizer state
    read (not yet applied to packs), as optimizer_state() shows it; training on from either
    checkpoint is the same."""
    from harmony.io import checkpoint

    t, batches = _trainer(), _batches()
    with t:
        t.step(*batches[0])
        t.save(tmp_path / "a")
    with _trainer() as u:
        u.load(tmp_path / "a")
        tensors, scalars, _ = u.optimizer_state()
        u.save(tmp_path / "b")
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert len(a[1]) > 0 and set(a[1]) == set(b[1]) == set(tensors)
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]) and torch.equal(a[1][k], tensors[k]), k
    assert a[2]["optimizer_scalars"] == b[2]["optimizer_scalars"] == scalars
    runs = []
    for name in ("a", "b"):
        with _trainer() as v:
            v.load(tmp_path / name)
            for x, y in batches[1:3]:
                v.step(x, y)
            runs.append(v.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
