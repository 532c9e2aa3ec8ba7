"""state_dict(), save() and export() read the training state pack by pack (chunk by chunk on
NVMe) and write safetensors one tensor at a time (harmony/training/streaming.py,
harmony/io/tensor_files.py, harmony/io/export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import harmony
from harmony.io.export import shard_names
from harmony.io.tensor_files import Streamed, TensorSpec, write_safetensors
from harmony.io.weights import WeightFiles
from harmony.training import streaming
from tests.models import MODELS, TinyTransformer

LOSS = MODELS["transformer"][1]


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [MODELS["transformer"][2](6, g) for _ in range(n)]


def _nvme_trainer(tmp_path: Path, **kw: object) -> harmony.Trainer:
    (tmp_path / "nvme").mkdir(exist_ok=True)
    return harmony.Trainer(TinyTransformer(), LOSS, micro_batch_size=2,
                           device_memory="200KiB", host_memory="400KiB",
                           nvme_dir=str(tmp_path / "nvme"), update_chunk="16KiB",
                           **kw)  # type: ignore[arg-type]


def test_written_files_are_ordinary_safetensors(tmp_path: Path) -> None:
    tensors = {"f": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16),
               "i": torch.arange(6).view(2, 3), "b": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "view": torch.randn(4, 4).t()}  # (not contiguous)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_producer_that_breaks_its_specs_is_refused(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(ValueError, match=r"expected 'b' torch.float32 \(2,\), got 'b' "):
        write_safetensors(tmp_path / "x", Streamed(specs, lambda: iter(
            [("a", torch.zeros(2)), ("b", torch.zeros(3))])))
    with pytest.raises(ValueError, match="no value was produced for 'b'"):
        write_safetensors(tmp_path / "x", Streamed(specs, lambda: iter([("a", torch.zeros(2))])))
    with pytest.raises(ValueError, match="more tensors were produced"):
        write_safetensors(tmp_path / "x", Streamed(specs[:1], lambda: iter(
            [("a", torch.zeros(2)), ("b", torch.zeros(2))])))
    with pytest.raises(ValueError, match="safetensors cannot store"):
        write_safetensors(tmp_path / "x", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_nvme_state_dict_and_export_match_the_model_read_whole(tmp_path: Path) -> None:
    """An NVMe-homed model's weights, read back chunk by chunk, are the weights; exported in
    shards they read back (the Hugging Face layout) key for key."""
    with _nvme_trainer(tmp_path) as t:
        for x, y in _batches():
            t.step(x, y)
        assert t.plan is not None and "nvme" in t.plan.placement.to_json()["w"]
        sd = t.state_dict()
        assert list(sd) == list(TinyTransformer().state_dict())
        out = t.export(tmp_path / "out", max_shard_size="40KB")
    names = sorted(p.name for p in out.iterdir())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    count = len(set(index["weight_map"].values()))
    assert count > 2 and names == sorted([*shard_names(count), "model.safetensors.index.json"])
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                  for v in sd.values())
    files = WeightFiles.open(out)
    assert sorted(files.keys()) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(files.read(k), v), k


def test_export_replaces_an_earlier_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with _nvme_trainer(tmp_path) as t:
        t.step(*_batches(1)[0])
        t.export(out, max_shard_size="40KB")
        (out / "notes.txt").write_text("mine")
        t.export(out)  # one file now: the shards and their index go
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]
        t.export(out, max_shard_size="40KB")  # and back
        assert "model.safetensors" not in {p.name for p in out.iterdir()}
        assert (out / "notes.txt").read_text() == "mine"


def test_state_dict_larger_than_the_memory_available_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _nvme_trainer(tmp_path) as t:
        t.step(*_batches(1)[0])
        monkeypatch.setattr(streaming, "available_bytes", lambda: 1000)
        with pytest.raises(MemoryError, match=r"state_dict\(\) would return .* more than the "
                                              r"1000B .*export\(dir\).*save\(dir\)"):
            t.state_dict()
        t.export(tmp_path / "out")  # what it points to works
        t.save(tmp_path / "ckpt")


def test_save_reads_one_chunk_at_a_time_and_loads_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint of an NVMe-homed model holds at most one chunk's weights or optimizer
    state in memory while it is written; it loads and training goes on bit for bit."""
    held, most, largest = [0], [0], [0]
    real = streaming.host_buffer

    def counting(trainer, nbytes, what):  # type: ignore[no-untyped-def]
        buf, free = real(trainer, nbytes, what)
        held[0] += nbytes
        most[0] = max(most[0], held[0])
        largest[0] = max(largest[0], nbytes)

        def release() -> None:
            held[0] -= nbytes
            free()

        return buf, release

    monkeypatch.setattr(streaming, "host_buffer", counting)
    batches = _batches(3)
    with _nvme_trainer(tmp_path) as t:
        t.step(*batches[0])
        t.save(tmp_path / "ckpt")
        t.step(*batches[1])
        want = t.state_dict()
        chunk = max(p.layout.w_bytes for p in t.runtime.packs)  # type: ignore[union-attr]
    assert 0 < most[0] == largest[0] < chunk  # one buffer at a time, less than a pack
    with _nvme_trainer(tmp_path) as fresh:
        fresh.load(tmp_path / "ckpt")
        fresh.step(*batches[1])
        got = fresh.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k
