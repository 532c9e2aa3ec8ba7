"""Weights read from files one tensor at a time: the source of ``Trainer(weights=PATH)``.

``PATH`` is one of

* a safetensors file;
* a directory in the Hugging Face layout: ``model.safetensors``, or shards named by
  ``model.safetensors.index.json`` (its ``weight_map``: key -> shard file);
* a harmony checkpoint: a directory :meth:`harmony.Trainer.save` wrote (its newest complete
  checkpoint is read, its ``model.safetensors`` checked against the SHA-256 in ``meta.json``
  first), or one ``ckpt-*`` folder of it.

Files are read with the safetensors library (``safe_open``), never unpickled. Each
:meth:`WeightFiles.read` opens the file, copies one tensor out and closes it again, so that
the pages of the file it touched are unmapped: reading a model larger than host memory keeps
one tensor in memory at a time.

>>> import tempfile, os
>>> from safetensors.torch import save_file
>>> d = tempfile.mkdtemp()
>>> save_file({"w": torch.ones(2, 2)}, os.path.join(d, "model.safetensors"))
>>> files = WeightFiles.open(d)
>>> files.keys(), files.read("w").sum().item()
(['w'], 4.0)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightsError(ValueError):
    """``weights=`` names nothing readable, or files that do not match the model; the message
    names the path, the keys or shapes, and what to do."""


def _safe_open() -> object:
    try:
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("weights= needs the safetensors package: pip install safetensors"
                          ) from err
    return safe_open


@dataclass(frozen=True)
class Info:
    """What a file says of one tensor."""

    file: Path
    dtype: str  # the safetensors name, e.g. "F32"
    shape: tuple[int, ...]


class WeightFiles:
    """Tensors by key across one or more safetensors files (see the module's text).

    Args:
        files: key -> the file holding it.
        origin: the path the user gave, for messages.
    """

    def __init__(self, files: dict[str, Path], origin: str) -> None:
        self.origin = origin
        self._file = files
        self._info: dict[str, Info] = {}

    @staticmethod
    def open(path: str | os.PathLike[str]) -> WeightFiles:
        """The weights at ``path`` (see the module's text).

        Raises:
            WeightsError: nothing readable there; the message says what was expected.
        """
        p = Path(path)
        if p.is_file():
            return WeightFiles._from_files([p], str(path))
        if not p.is_dir():
            raise WeightsError(f"weights={str(path)!r} does not exist; give a safetensors file, "
                               "a directory with model.safetensors (or its shards and "
                               f"{INDEX}), or a harmony checkpoint directory")
        if (p / INDEX).is_file():
            return WeightFiles._from_index(p / INDEX, str(path))
        if (p / SINGLE).is_file() and not (p / "meta.json").is_file():
            return WeightFiles._from_files([p / SINGLE], str(path))
        return WeightFiles._from_checkpoint(p, str(path))

    @staticmethod
    def _from_files(files: list[Path], origin: str) -> WeightFiles:
        safe_open = _safe_open()
        where: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:  # type: ignore[operator]
                    keys = list(h.keys())
            except Exception as err:  # the library's own error for a file it cannot read
                raise WeightsError(f"weights={origin!r}: {f} is not a readable safetensors "
                                   f"file ({type(err).__name__}: {err})") from err
            for k in keys:
                where.setdefault(k, f)
        return WeightFiles(where, origin)

    @staticmethod
    def _from_index(index: Path, origin: str) -> WeightFiles:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {k: index.parent / v for k, v in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise WeightsError(f"weights={origin!r}: {index} is not a safetensors index (a JSON "
                               f"object with a 'weight_map' of key -> file): {err}") from err
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise WeightsError(f"weights={origin!r}: the shards {missing[:3]} named by {index} "
                               "are missing")
        return WeightFiles(files, origin)

    @staticmethod
    def _from_checkpoint(path: Path, origin: str) -> WeightFiles:
        from harmony.io import checkpoint

        ckpt = path if (path / "meta.json").is_file() else checkpoint.latest(path)
        if ckpt is None:
            raise WeightsError(f"weights={origin!r} is a directory with neither {SINGLE}, nor "
                               f"{INDEX}, nor a complete harmony checkpoint")
        model = ckpt / checkpoint.TENSOR_FILES[0]
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            expected = meta["sha256"][model.name]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"weights={origin!r}: {ckpt / 'meta.json'} is not a harmony "
                               f"checkpoint's ({err})") from err
        if not model.is_file() or checkpoint._sha256(model) != expected:
            raise WeightsError(f"weights={origin!r}: {model} is missing, truncated or corrupted "
                               "(its SHA-256 does not match meta.json); restore it or use an "
                               "older checkpoint")
        return WeightFiles._from_files([model], origin)

    def keys(self) -> list[str]:
        return list(self._file)

    def __contains__(self, key: object) -> bool:
        return key in self._file

    def info(self, key: str) -> Info:
        """dtype and shape of ``key`` as its file's header says (cheap: no data is read)."""
        if key not in self._info:
            f = self._file[key]
            with _safe_open()(f, framework="pt") as h:  # type: ignore[operator]
                s = h.get_slice(key)
                self._info[key] = Info(f, s.get_dtype(), tuple(s.get_shape()))
        return self._info[key]

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, as a new CPU tensor (the file is closed again)."""
        with _safe_open()(self._file[key], framework="pt") as h:  # type: ignore[operator]
            return h.get_tensor(key)

    def __repr__(self) -> str:
        files = sorted({str(f) for f in self._file.values()})
        return f"WeightFiles({self.origin!r}, {len(self._file)} tensors in {len(files)} files)"
