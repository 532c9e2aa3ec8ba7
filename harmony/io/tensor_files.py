"""safetensors files written one tensor at a time, so no file is ever whole in memory.

The safetensors library writes a file from tensors that are all in memory at once. A model
whose weights exceed host memory is written here instead: the header (every tensor's key,
dtype, shape and byte range) is known before any value, so it is written first, and the
values follow in that order as they are produced, each freed once written (a pack of layers
read back from NVMe, say). The result is an ordinary safetensors file: the library's
``safe_open`` and ``load_file`` read it (``tests/training/test_streaming.py``).

A :class:`Streamed` is the lazy stand-in for a dict of tensors: the specs, and a function
that yields ``(key, tensor)`` in the specs' order.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
>>> specs = [TensorSpec("a", torch.float32, (2, 3)), TensorSpec("b", torch.int64, (4,))]
>>> write_safetensors(path, Streamed(specs, lambda: iter([("a", torch.ones(2, 3)),
...                                                        ("b", torch.arange(4))])))
>>> from safetensors.torch import load_file
>>> sorted(load_file(path))
['a', 'b']
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from swap.tier import fmt_bytes

# torch dtype -> the safetensors header's name for it
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a safetensors header names it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class Streamed:
    """Tensors produced one at a time: ``specs`` in file order, and ``produce()`` yielding
    ``(key, tensor)`` in that order (each may be freed once yielded on)."""

    specs: list[TensorSpec]
    produce: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> Streamed:
    """A dict of tensors as a :class:`Streamed` (in its order)."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return Streamed(specs, lambda: iter(tensors.items()))


def _header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for s in specs:
        if s.dtype not in DTYPES:
            raise ValueError(f"tensor {s.key!r} has dtype {s.dtype}, which safetensors cannot "
                             f"store; convert it to one of {sorted(map(str, DTYPES))}")
        if s.key in header:
            raise ValueError(f"tensor {s.key!r} appears twice; every key must be unique")
        header[s.key] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes


def write_safetensors(path: str | os.PathLike[str],
                      tensors: Streamed | Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, todo: str = "") -> None:
    """Write ``tensors`` (a :class:`Streamed` or a dict) as the safetensors file ``path``,
    one tensor in memory at a time; the caller makes it durable (fsync) and atomic (rename).

    Raises:
        ValueError: a produced tensor whose key, dtype or shape differs from its spec, too
            few or too many tensors, or a dtype safetensors cannot store; the message names
            it. The partial file is left for the caller to remove.
        OSError: the disk is full (``ENOSPC``) or unwritable, naming ``path``, the bytes the
            file needs and ``todo`` (what the caller's user should do). The partial file is
            left for the caller to remove.
    """
    streamed = tensors if isinstance(tensors, Streamed) else specs_of(tensors)
    header = _header(streamed.specs, metadata)
    try:
        _write(path, streamed, header)
    except OSError as err:
        raise OSError(err.errno if err.errno is not None else errno.EIO,
                      f"writing {path} failed ({err.strerror or err}); the file needs "
                      f"{fmt_bytes(streamed.nbytes + len(header) + 8)}"
                      f"{'; ' + todo if todo else ''}") from err


def _write(path: str | os.PathLike[str], streamed: Streamed, header: bytes) -> None:
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        produced = streamed.produce()
        for spec in streamed.specs:
            try:
                key, value = next(produced)
            except StopIteration:
                raise ValueError(f"{path}: no value was produced for {spec.key!r} (and the "
                                 "tensors after it)") from None
            if key != spec.key or value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
                raise ValueError(f"{path}: expected {spec.key!r} {spec.dtype} {spec.shape}, "
                                 f"got {key!r} {value.dtype} {tuple(value.shape)}")
            data = value.detach().cpu().contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))  # type: ignore[arg-type]
            del value, data  # (freed before the next is produced)
        if next(produced, None) is not None:
            raise ValueError(f"{path}: more tensors were produced than the header names")
