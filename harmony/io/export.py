"""Weights written as Hugging Face writes them: one safetensors file, or shards and an index.

``save_pretrained`` writes ``model.safetensors``, or, when the weights exceed its
``max_shard_size``, shards ``model-00001-of-00003.safetensors`` ... and
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {key:
shard}}``), which ``from_pretrained`` and :mod:`harmony.io.weights` read. :func:`write_shards`
writes the same from tensors produced one at a time (:mod:`harmony.io.tensor_files`), each file
under a temporary name, synced and renamed into place, the index last; the files of an earlier
export in that folder that the new one does not replace are removed once it is complete.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from harmony.io.tensor_files import Streamed, TensorSpec, specs_of, write_safetensors
from harmony.io.weights import INDEX, SINGLE


def shard_names(count: int) -> list[str]:
    """The file names of ``count`` shards, as ``save_pretrained`` names them.

    >>> shard_names(2)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    if count == 1:
        return [SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def split(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """``specs`` in order, cut into runs of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _durable(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_shards(folder: Path, tensors: Streamed | Mapping[str, torch.Tensor],
                 max_bytes: int) -> list[Path]:
    """Write ``tensors`` into ``folder`` as one ``model.safetensors`` or shards of at most
    ``max_bytes`` and their index; returns the files written.

    Raises:
        OSError: the disk is full or unwritable (what was written of this export is removed;
            an earlier export there stays as it was until this one is complete).
    """
    streamed = tensors if isinstance(tensors, Streamed) else specs_of(tensors)
    shards = split(streamed.specs, max_bytes)
    names = shard_names(len(shards))
    produced = streamed.produce()
    written: list[Path] = []
    try:
        for name, specs in zip(names, shards):
            tmp = folder / f".{name}.tmp"
            write_safetensors(tmp, Streamed(specs, partial(itertools.islice, produced,
                                                           len(specs))),
                              metadata={"format": "pt"},
                              todo=f"free space in {folder} or export elsewhere; an earlier "
                                   "export there is as it was")
            _durable(tmp)
            written.append(tmp)
        if len(shards) > 1:
            index = {"metadata": {"total_size": streamed.nbytes},
                     "weight_map": {s.key: name for name, specs in zip(names, shards)
                                    for s in specs}}
            tmp = folder / f".{INDEX}.tmp"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
            _durable(tmp)
            written.append(tmp)
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        for name in names:
            (folder / f".{name}.tmp").unlink(missing_ok=True)
        raise
    old = _previous_export(folder)
    final = []
    for tmp in written:  # shards first, the index (which names them) last
        path = folder / tmp.name[1:-len(".tmp")]
        os.replace(tmp, path)
        final.append(path)
    for stale in old - {p.name for p in final}:
        (folder / stale).unlink(missing_ok=True)
    return final


def _previous_export(folder: Path) -> set[str]:
    """The weight files an earlier export (or ``save_pretrained``) left in ``folder``."""
    out = {SINGLE} if (folder / SINGLE).is_file() else set()
    index = folder / INDEX
    if index.is_file():
        out.add(INDEX)
        # (an unreadable index: only it is replaced)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            out |= set(json.loads(index.read_text())["weight_map"].values())
    return {name for name in out if "/" not in name and name not in ("", ".", "..")}
