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
import weakref
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


_NAMES = {name: dtype for dtype, name in DTYPES.items()}


class FileTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read from disk when it is looked up: the
    stand-in for ``load_file(path)`` where the file may exceed host memory (a checkpoint's
    optimizer state, say). Only the header is read up front.

    The file is held open, so it stays readable if it is deleted or replaced meanwhile (a
    writer pruning old checkpoints); the descriptor is closed with the mapping.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_safetensors(path, {"a": torch.ones(2, 3), "b": torch.arange(4)})
    >>> t = FileTensors(path)
    >>> sorted(t), t.spec("a").shape, t["b"].tolist()
    (['a', 'b'], (2, 3), [0, 1, 2, 3])

    Raises:
        ValueError: ``path`` is not a safetensors file (a header that does not parse, an
            unknown dtype, a byte range past the file's end).
    """

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None) -> None:
        self.path = str(path)
        self._fd = os.open(path, os.O_RDONLY) if fd is None else os.dup(fd)
        self._close = weakref.finalize(self, os.close, self._fd)
        try:
            self._specs, self._ranges = self._read_header()
        except BaseException:
            self._close()
            raise

    def _read_header(self) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]]]:
        size = os.fstat(self._fd).st_size
        try:
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(os.pread(self._fd, n, 8))
            specs, ranges = {}, {}
            for key, e in header.items():
                if key == "__metadata__":
                    continue
                begin, end = (8 + n + int(o) for o in e["data_offsets"])
                spec = TensorSpec(key, _NAMES[e["dtype"]], tuple(int(d) for d in e["shape"]))
                if not 8 + n <= begin <= end <= size or end - begin != spec.nbytes:
                    raise ValueError(f"tensor {key!r}'s bytes {begin}..{end} do not fit")
                specs[key], ranges[key] = spec, (begin, end)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{self.path} is not a safetensors file ({err!r})") from err
        return specs, ranges

    def spec(self, key: str) -> TensorSpec:
        """``key``'s dtype and shape, from the header (no data is read)."""
        return self._specs[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        spec, (begin, end) = self._specs[key], self._ranges[key]
        # A tensor of its own (not a view of a byte buffer: a view would keep its base alive
        # after its own storage is swapped out, as the packs do with optimizer state).
        out = torch.empty(spec.shape, dtype=spec.dtype)
        view, done = out.view(-1).view(torch.uint8).numpy().data, 0
        while done < end - begin:
            got = os.preadv(self._fd, [view[done:]], begin + done)
            if got == 0:
                raise OSError(errno.EIO, f"{self.path} ended while reading {key!r}")
            done += got
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def close(self) -> None:
        """Close the file now (lookups fail after)."""
        self._close()

    def __repr__(self) -> str:
        return f"FileTensors({self.path!r}, {len(self._specs)} tensors)"
