"""Checkpoints lose nothing, whatever the user does: an emergency save after an interrupted
step is refused, readers never delete, concurrent writers serialize, names never leave the
checkpoint directory, and a bad checkpoint is refused before anything is replaced."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import harmony
from harmony.io import checkpoint
from tests.fs import tmpfs
from tests.models import MODELS, training_state_bytes


def _opt(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _trainer(optimizer: Any = _opt, budget: bool = True) -> harmony.Trainer:
    factory, loss_fn, _ = MODELS["transformer"]
    limit = training_state_bytes(factory(0.0), 8) // 2 if budget else None
    return harmony.Trainer(factory(0.0), loss_fn, optimizer=optimizer, micro_batch_size=2,
                           device_memory=limit)


def _batch(i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return MODELS["transformer"][2](5, g)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# -- an emergency save after an interrupted step --------------------------------------------

class _Interrupting(torch.optim.AdamW):
    """AdamW whose step raises KeyboardInterrupt once armed, at the given call (as a Ctrl-C
    landing while the packs are being updated would)."""

    armed: ClassVar[list[int]] = []  # steps still to run before the interrupt; [] disarmed

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if _Interrupting.armed:
            _Interrupting.armed[0] -= 1
            if _Interrupting.armed[0] < 0:
                _Interrupting.armed.clear()
                raise KeyboardInterrupt
        return super().step(closure)


def test_save_after_an_interrupted_step_is_refused_and_the_checkpoint_survives(
        tmp_path: Path) -> None:
    with _trainer(optimizer=lambda ps: _Interrupting(ps, lr=1e-2)) as t:
        t.step(*_batch(0))
        t.save(tmp_path)
        good = _files(tmp_path)
        want = t.state_dict()
        assert t.plan is not None and len(t.plan.bounds) > 2
        _Interrupting.armed[:] = [1]  # the second pack's update is interrupted
        with pytest.raises(KeyboardInterrupt):
            t.step(*_batch(1))
        with pytest.raises(RuntimeError, match=r"step 1 .*updating packs .*intact"):
            t.save(tmp_path)
        with pytest.raises(RuntimeError, match="no longer those of one consistent step"):
            t.export(tmp_path / "export")
        with pytest.raises(RuntimeError, match="inconsistent_ok=True"):
            t.state_dict()
        mixed = t.state_dict(inconsistent_ok=True)  # asked for explicitly: given
        assert any(not torch.equal(mixed[k], want[k]) for k in want)
        assert _files(tmp_path) == good, "the last good checkpoint was changed"
        assert not (tmp_path / "export").exists()
        t.load(tmp_path)  # loading the good checkpoint makes the trainer whole again
        assert all(torch.equal(t.state_dict()[k], want[k]) for k in want)
        t.step(*_batch(1))
        t.save(tmp_path)


def test_an_interrupt_after_the_last_update_also_counts(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pack took the step but the step's bookkeeping (its count, the schedulers) did
    not happen: saving would file the new weights under the old step number."""
    with _trainer() as t:
        t.step(*_batch(0))
        t.save(tmp_path)
        good = _files(tmp_path)

        def interrupted(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(t.precision, "update_scale", interrupted)
        with pytest.raises(KeyboardInterrupt):
            t.step(*_batch(1))
        monkeypatch.undo()
        assert t.step_count == 1
        with pytest.raises(RuntimeError, match="intact"):
            t.save(tmp_path)
        assert _files(tmp_path) == good


# -- readers never delete; writers serialize -------------------------------------------------

def test_a_reader_never_removes_a_save_in_progress(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation job loads while the training job saves into the same directory."""
    with _trainer(budget=False) as writer, _trainer(budget=False) as reader:
        writer.step(*_batch(0))
        writer.save(tmp_path)
        writer.step(*_batch(1))
        want = writer.state_dict()
        inside, go = threading.Event(), threading.Event()
        real = checkpoint._fsync_dir

        def paused(path: Path) -> None:  # the new checkpoint is written, not yet renamed
            if Path(path).name.startswith(".tmp-ckpt-") and not go.is_set():
                inside.set()
                assert go.wait(60)
            real(path)

        monkeypatch.setattr(checkpoint, "_fsync_dir", paused)
        errors: list[BaseException] = []

        def save() -> None:
            try:
                writer.save(tmp_path)
            except BaseException as err:
                errors.append(err)

        thread = threading.Thread(target=save)
        thread.start()
        assert inside.wait(60)
        before = sorted(os.listdir(tmp_path))
        reader.load(tmp_path)  # reads the previous checkpoint, touches nothing
        assert sorted(os.listdir(tmp_path)) == before
        go.set()
        thread.join(60)
        assert not errors, errors
        assert (tmp_path / "LATEST").read_text().strip() == "ckpt-000000002"
        reader.load(tmp_path)
        assert reader.step_count == 2
        got = reader.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def _writer(root: str, seed: int, saves: int, failures: Any) -> None:
    torch.manual_seed(seed)
    for i in range(saves):
        try:
            checkpoint.save(root, seed * 1000 + i, {"w": torch.randn(256)}, {}, {"by": seed})
        except BaseException as err:
            failures.put(f"writer {seed} save {i}: {type(err).__name__}: {err}")


def _reader(root: str, stop: Any, failures: Any, loads: Any) -> None:
    while not stop.is_set():
        try:
            weights, _, meta = checkpoint.load(root)
            assert weights["w"].shape == (256,) and "by" in meta
            loads.value += 1
        except BaseException as err:
            failures.put(f"reader: {type(err).__name__}: {err}")


def test_concurrent_writers_serialize_and_readers_always_find_a_checkpoint(
        tmp_path: Path) -> None:
    # (spawn: a fork of this process, whose earlier tests left threads behind, may hang)
    ctx = multiprocessing.get_context("spawn")
    checkpoint.save(tmp_path, 0, {"w": torch.zeros(256)}, {}, {"by": 0})
    failures, stop, loads = ctx.Queue(), ctx.Event(), ctx.Value("i", 0)
    readers = [ctx.Process(target=_reader, args=(str(tmp_path), stop, failures, loads))
               for _ in range(2)]
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), s, 25, failures))
               for s in range(1, 5)]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(120)
    stop.set()
    for p in readers:
        p.join(60)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, f"{len(errors)} failures, e.g. {errors[:3]}"
    assert all(p.exitcode == 0 for p in readers + writers)
    assert loads.value > 0
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("ckpt-")] == [
        (tmp_path / "LATEST").read_text().strip()]
    assert set(names) <= {"LATEST", ".lock", *[n for n in names if n.startswith("ckpt-")]}


def test_the_next_save_finishes_a_save_killed_before_it_pruned(tmp_path: Path) -> None:
    """A save killed after LATEST moved on leaves the older checkpoint and maybe a
    half-written one: a load leaves them be, the next save removes them."""
    import shutil

    with _trainer() as t:
        t.step(*_batch(0))
        first = t.save(tmp_path)
        kept = tmp_path.parent / "kept"
        shutil.copytree(first, kept)
        t.step(*_batch(1))
        second = t.save(tmp_path)
        shutil.copytree(kept, first)  # what the killed save had not removed yet
        (tmp_path / ".tmp-ckpt-debris").mkdir()
        before = sorted(os.listdir(tmp_path))
        with _trainer() as other:
            other.load(tmp_path)
            assert other.step_count == 2
        assert sorted(os.listdir(tmp_path)) == before  # a reader removes nothing
        with _trainer() as other:  # a checkpoint folder named directly is only read too
            other.load(first)
            assert other.step_count == 1 and first.exists()
        t.step(*_batch(2))
        third = t.save(tmp_path)
    assert sorted(p for p in os.listdir(tmp_path) if p != ".lock") == ["LATEST", third.name]
    assert not second.exists()


def test_saving_the_same_step_twice_keeps_a_checkpoint_at_every_moment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second save of a step replaces the first: whenever the writer stops, a complete
    checkpoint is found."""
    with _trainer() as t:
        t.step(*_batch(0))
        t.save(tmp_path)
        seen: list[int | None] = []
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            found = checkpoint.latest(tmp_path)
            seen.append(None if found is None else json.loads(
                (found / "meta.json").read_text())["step"])
            real_replace(src, dst)
            found = checkpoint.latest(tmp_path)
            seen.append(None if found is None else json.loads(
                (found / "meta.json").read_text())["step"])

        monkeypatch.setattr(checkpoint.os, "replace", replace)
        t.save(tmp_path)
        monkeypatch.undo()
    assert seen and None not in seen
    checkpoint.load(tmp_path)


# -- names stay inside the checkpoint directory ----------------------------------------------

@pytest.mark.parametrize("pointer", ["../elsewhere/ckpt-000000001", "/tmp/ckpt-000000001",
                                     "ckpt-000000001/../../elsewhere/ckpt-000000001"])
def test_latest_pointing_outside_is_refused_and_deletes_nothing(tmp_path: Path,
                                                                pointer: str) -> None:
    root, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    with _trainer() as t:
        t.step(*_batch(0))
        t.save(root)
        t.save(elsewhere)
        (root / "LATEST").write_text(pointer + "\n")
        before = _files(tmp_path)
        with pytest.raises(harmony.CheckpointError, match=f"LATEST.*{pointer}"):
            t.load(root)
        with pytest.raises(harmony.CheckpointError, match="LATEST"):
            checkpoint.latest(root)
        assert _files(tmp_path) == before


def test_symlinks_leaving_the_directory_are_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    with _trainer() as t:
        t.step(*_batch(0))
        mine = t.save(root)
        theirs = t.save(elsewhere)
        (root / "ckpt-000000007").symlink_to(theirs)
        (root / "LATEST").write_text("ckpt-000000007\n")
        with pytest.raises(harmony.CheckpointError, match="ckpt-000000007.*outside"):
            t.load(root)
        (root / "LATEST").write_text(mine.name + "\n")
        (mine / "model.safetensors").unlink()
        (mine / "model.safetensors").symlink_to(theirs / "model.safetensors")
        with pytest.raises(harmony.CheckpointError, match="model.safetensors.*outside"):
            t.load(root)
    assert (theirs / "model.safetensors").is_file()


# -- a bad checkpoint is refused before anything is replaced ---------------------------------

def _edit_meta(ckpt: Path, **changes: Any) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            del meta[k]
        else:
            meta[k] = v
    (ckpt / "meta.json").write_text(json.dumps(meta))


_DELETE = object()


@pytest.mark.parametrize("stepped", [False, True])
@pytest.mark.parametrize(("change", "match"), [
    ({"step_count": "lots"}, r"step_count.*'lots'"),
    ({"step_count": -3}, r"step_count.*-3"),
    ({"seed": 1.5}, r"seed.*1\.5"),
    ({"optimizer_groups": _DELETE}, r"optimizer_groups.*missing"),
    ({"optimizer_groups": "adam"}, r"optimizer_groups.*'adam'"),
    ({"optimizer_scalars": [1, 2]}, r"optimizer_scalars"),
    ({"lr_scheduler": 7}, r"lr_scheduler.*7"),
    ({"precision": "bf16"}, r"precision.*'bf16'"),
    ({"sha256": {"model.safetensors": 3}}, r"sha256"),
])
def test_a_bad_meta_json_changes_nothing(tmp_path: Path, stepped: bool,
                                         change: dict[str, Any], match: str) -> None:
    with _trainer() as t:
        t.step(*_batch(0))
        ckpt = t.save(tmp_path)
    with _trainer() as t:
        if stepped:
            t.step(*_batch(5))
        before, count = t.state_dict(), t.step_count
        _edit_meta(ckpt, **change)
        with pytest.raises(harmony.CheckpointError, match=match):
            t.load(tmp_path)
        assert t.step_count == count
        after = t.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
        t.step(*_batch(6))  # still whole: it trains on


@pytest.mark.parametrize("stepped", [False, True])
def test_an_sgd_checkpoint_into_an_adamw_trainer_names_both(tmp_path: Path,
                                                            stepped: bool) -> None:
    with _trainer(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) as t:
        t.step(*_batch(0))
        t.save(tmp_path)
    with _trainer() as t:
        if stepped:
            t.step(*_batch(0))
        before, count = t.state_dict(), t.step_count
        with pytest.raises(harmony.CheckpointError, match=r"SGD.*AdamW"):
            t.load(tmp_path)
        assert t.step_count == count
        assert all(torch.equal(t.state_dict()[k], before[k]) for k in before)
        t.step(*_batch(1))


def test_optimizer_state_of_unknown_parameters_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    with _trainer() as t:
        t.step(*_batch(0))
        ckpt = t.save(tmp_path)
        opt = load_file(ckpt / "optimizer.safetensors")
        opt["no.such.weight/exp_avg"] = torch.zeros(3)
        save_file(opt, ckpt / "optimizer.safetensors")
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["sha256"]["optimizer.safetensors"] = checkpoint._sha256(
            ckpt / "optimizer.safetensors")
        (ckpt / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(harmony.CheckpointError, match="no.such.weight"):
            t.load(tmp_path)


# -- export on a full disk --------------------------------------------------------------------

def test_export_on_a_full_disk_raises_an_oserror_naming_path_and_bytes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    with tmpfs(tmp_path / "small", "size=64k") as small, _trainer(budget=False) as t:
        t.step(*_batch(0))
        with pytest.raises(OSError, match=r"model\.safetensors.*needs [0-9.]+ ?[KMG]?i?B") as err:
            t.export(small / "out")
        assert err.value.errno is not None
        assert not (small / "out" / "model.safetensors").exists()
        assert not list((small / "out").glob(".*")), "a partial file was left"


def test_a_reader_whose_listing_missed_the_newest_checkpoint_looks_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a reader reading LATEST and looking at what it names, a writer saves a newer
    checkpoint and prunes the named one; the reader's directory listing (no snapshot) still
    shows the pruned one and not the new one. The reader looks again instead of finding none."""
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(4)}, {}, {})
    pointer, entries = checkpoint._pointer, checkpoint._entries
    raced: list[Path] = []

    def read_then_writer_moves_on(root: Path) -> str | None:
        name = pointer(root)
        if not raced:
            raced.append(root)  # (the writer's own reads and listings are not stale)
            checkpoint.save(tmp_path, 2, {"w": torch.ones(4)}, {}, {})  # prunes ckpt 1
            raced[0] = root / str(name)
        return name

    def stale_listing(root: Path, prefix: str) -> list[Path]:
        if prefix == "ckpt-" and len(raced) == 1 and raced[0] != root:
            raced.append(root)
            return [raced[0]]  # listed before the writer: the pruned one, not the new one
        return entries(root, prefix)

    monkeypatch.setattr(checkpoint, "_pointer", read_then_writer_moves_on)
    monkeypatch.setattr(checkpoint, "_entries", stale_listing)
    weights, _, _ = checkpoint.load(tmp_path)
    assert len(raced) == 2, "the race was not staged"
    assert torch.equal(weights["w"], torch.ones(4))
