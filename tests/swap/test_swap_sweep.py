"""The NVMe store removes only what harmony provably made: swap directories whose marker names
an owner that is gone; a user's directory is never touched. A run that ends without close()
still leaves no swap files behind. Bad nvme_dir values are refused, naming them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import harmony
from swap import nvme
from swap.nvme import NvmeStore
from tests.models import MODELS, training_state_bytes

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _user_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    (d / "precious.txt").write_text("the user's data")
    return d


def test_a_users_directory_named_like_a_swap_directory_survives(tmp_path: Path) -> None:
    dirs = [_user_dir(tmp_path, n) for n in ("harmony-2024-checkpoints", "harmony-1-x",
                                             "harmony-99999999-run")]
    forged = _user_dir(tmp_path, "harmony-4000000-abc")  # a marker that is not JSON
    (forged / nvme.MARKER).write_text("not a marker")
    linked = _user_dir(tmp_path, "harmony-4000001-abc")  # a marker that is a symlink
    (tmp_path / "elsewhere.json").write_text(json.dumps(
        {"harmony": "swap", "pid": 4000001, "start": "1", "boot": "x"}))
    (linked / nvme.MARKER).symlink_to(tmp_path / "elsewhere.json")
    with NvmeStore(tmp_path, backend="buffered"):
        pass
    for d in [*dirs, forged, linked]:
        assert (d / "precious.txt").read_text() == "the user's data", d


def test_a_dead_runs_swap_directory_is_swept(tmp_path: Path) -> None:
    _run(f"""
        import os
        from swap.nvme import NvmeStore
        s = NvmeStore({str(tmp_path)!r}, backend="buffered")
        import torch
        s.write("k", torch.zeros(10)).wait()
        os._exit(0)  # as a killed run would: no close(), no finalizers
    """)
    left = [p for p in tmp_path.iterdir() if p.name.startswith("harmony-")]
    assert len(left) == 1 and (left[0] / nvme.MARKER).is_file()
    with NvmeStore(tmp_path, backend="buffered") as store:
        assert [p.name for p in tmp_path.iterdir()] == [store.directory.name]


def test_a_live_pid_of_another_process_start_is_stale(tmp_path: Path) -> None:
    """The pid was reused by an unrelated process: its start time tells them apart."""
    with NvmeStore(tmp_path, backend="buffered") as live:
        stale = tmp_path / f"harmony-{os.getpid()}-reused"
        stale.mkdir()
        marker = json.loads((live.directory / nvme.MARKER).read_text())
        assert marker["pid"] == os.getpid()
        (stale / nvme.MARKER).write_text(json.dumps({**marker, "start": "1"}))
        (stale / "pack0.W.0").write_bytes(b"\0" * 100)
        twin = tmp_path / f"harmony-{os.getpid()}-alive"  # the same owner, alive: kept
        twin.mkdir()
        (twin / nvme.MARKER).write_text(json.dumps(marker))
        with NvmeStore(tmp_path, backend="buffered"):
            assert not stale.exists()
            assert twin.exists() and live.directory.exists()


def test_a_trainer_never_closed_leaves_no_swap_files_at_exit(tmp_path: Path) -> None:
    nvme_dir = tmp_path / "nvme"
    nvme_dir.mkdir()
    factory, _, _ = MODELS["transformer"]
    state = training_state_bytes(factory(0.0), 8)
    _run(f"""
        import torch, harmony
        from tests.models import MODELS
        factory, loss_fn, data = MODELS["transformer"]
        t = harmony.Trainer(factory(0.0), loss_fn, micro_batch_size=2,
                            device_memory={state // 2}, host_memory={state // 2},
                            nvme_dir={str(nvme_dir)!r}, nvme_backend="buffered")
        t.step(*data(4, torch.Generator().manual_seed(0)))
        assert t.store is not None and len(t.store) > 0
        # the script ends here, without t.close()
    """)
    assert os.listdir(nvme_dir) == []


def test_a_store_dropped_without_close_removes_its_directory(tmp_path: Path) -> None:
    store = NvmeStore(tmp_path, backend="buffered")
    store.write("k", torch.zeros(10)).wait()
    directory = store.directory
    del store
    import gc

    gc.collect()
    assert not directory.exists()


@pytest.mark.parametrize(("value", "match"), [
    ("", r"nvme_dir='' is empty"),
    (3, r"nvme_dir=3 is not a path"),
    (b"/tmp", r"nvme_dir=b'/tmp' is not a path"),
])
def test_bad_nvme_dir_values_are_named(value: object, match: str) -> None:
    factory, loss_fn, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match=match):
        harmony.Trainer(factory(0.0), loss_fn, nvme_dir=value)  # type: ignore[arg-type]
    assert not list(Path.cwd().glob("harmony-*"))


def test_nvme_dir_naming_a_file_says_so(tmp_path: Path) -> None:
    f = tmp_path / "swapfile"
    f.write_text("x")
    factory, loss_fn, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match=r"nvme_dir '.*swapfile' is a file, not a directory"
                                         r"(?!.*mkdir)"):
        harmony.Trainer(factory(0.0), loss_fn, nvme_dir=str(f))
    assert f.read_text() == "x"


def test_a_forked_child_dropping_the_store_leaves_the_parents_directory(tmp_path: Path) -> None:
    store = NvmeStore(tmp_path, backend="buffered")
    try:
        pid = os.fork()
        if pid == 0:  # the child: drop its copy of the store, then exit normally
            code = 0
            try:
                store._finalizer()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.directory.is_dir()
        store.write("k", torch.zeros(4)).wait()
    finally:
        store.close()
    assert not store.directory.exists()
