"""FileTensors: a safetensors file read one tensor at a time, when it is looked up (what
checkpoint.load returns, so that a checkpoint larger than host memory is applied a tensor
at a time)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import harmony
from harmony.io import checkpoint
from harmony.io.tensor_files import FileTensors
from tests.models import MODELS, TinyTransformer

TENSORS = {"f": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16),
           "i": torch.arange(6).view(2, 3), "b": torch.tensor([True, False]),
           "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
           "half": torch.randn(2, 2).half()}


def test_reads_what_the_library_wrote(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    files, want = FileTensors(path), load_file(path)
    assert set(files) == set(want) and len(files) == len(want)
    for k, v in want.items():
        assert files.spec(k).shape == tuple(v.shape) and files.spec(k).dtype == v.dtype, k
        got = files[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    with pytest.raises(KeyError):
        files["nothing"]


def test_reads_nothing_until_a_tensor_is_looked_up(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, path)
    reads: list[int] = []
    preadv = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(sum(len(b) for b in buffers))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    files = FileTensors(path)
    assert reads == [] and files.spec("f").shape == (3, 5)
    files["f"]
    assert reads == [15 * 4]  # that tensor's bytes alone


def test_stays_readable_when_the_file_is_deleted(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, path)
    files = FileTensors(path)
    path.unlink()  # (a writer pruning an old checkpoint)
    assert torch.equal(files["f"], TENSORS["f"])
    files.close()
    with pytest.raises(OSError):
        files["f"]


@pytest.mark.parametrize("damage", ["header length", "header", "range", "dtype"])
def test_a_damaged_file_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4)}, path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if damage == "header length":
        raw[:8] = (len(raw) * 2).to_bytes(8, "little")
    elif damage == "header":
        raw[8:8 + n] = b"{" + b" " * (n - 1)
    elif damage == "range":
        raw = raw[:-4]  # the tensor's bytes run past the end
    else:
        raw[8:8 + n] = raw[8:8 + n].replace(b'"F32"', b'"X32"')
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{path} is not a safetensors file"):
        FileTensors(path)


def test_checkpoint_load_is_read_as_looked_up_and_loads_into_a_model(tmp_path: Path) -> None:
    _, loss, batch = MODELS["transformer"]
    g = torch.Generator().manual_seed(0)
    with harmony.Trainer(TinyTransformer(), loss, micro_batch_size=2) as t:
        t.step(*batch(4, g))
        t.save(tmp_path)
        want = t.state_dict()
    weights, optimizer, meta = checkpoint.load(tmp_path)
    assert isinstance(weights, FileTensors) and isinstance(optimizer, FileTensors)
    assert meta["step"] == 1 and len(optimizer) > 0
    fresh = TinyTransformer()
    fresh.load_state_dict(weights)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
