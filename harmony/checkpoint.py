"""Checkpoint files: safetensors for tensors, JSON for the rest, replaced atomically.

A checkpoint directory ``root`` holds complete checkpoints ``root/ckpt-<step>/`` and a file
``root/LATEST`` naming the newest. Saving writes a new checkpoint under a temporary name, fsyncs
every file, renames it into place, fsyncs the directory, then replaces ``LATEST`` the same way
and only then removes older checkpoints: a crash at any moment leaves the previous checkpoint
loadable. ``meta.json`` is written last and carries the SHA-256 of every tensor file, so a
truncated or corrupted file is detected on load. Loading never unpickles anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from harmony.tensor_files import Streamed, write_safetensors

FORMAT = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("checkpoints need the safetensors package: pip install safetensors"
                          ) from err
    return st


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(root: str | os.PathLike[str], step: int,
         model: dict[str, torch.Tensor] | Streamed,
         optimizer: dict[str, torch.Tensor] | Streamed, meta: dict[str, Any],
         keep: int = 1) -> Path:
    """Write a checkpoint for ``step`` under ``root`` atomically; returns its directory.

    ``model`` and ``optimizer`` are dicts of tensors, or :class:`~harmony.tensor_files.Streamed`
    producers: either way the files are written one tensor at a time.

    Raises:
        OSError: the disk is full or not writable; the previous checkpoint is left intact and
            the partial one is removed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    final = root / f"ckpt-{step:09d}"
    try:
        os.chmod(tmp, 0o700)
        sums = {}
        for name, tensors in zip(TENSOR_FILES, (model, optimizer)):
            path = tmp / name
            try:
                write_safetensors(path, tensors)
            except OSError:
                raise
            except Exception as err:  # safetensors reports I/O failures as its own error
                code = errno.ENOSPC if "No space" in str(err) else errno.EIO
                raise OSError(code, f"writing checkpoint file {path} failed ({err}); free "
                                    f"space in {root} or save elsewhere; the previous "
                                    "checkpoint is intact") from err
            os.chmod(path, 0o600)
            _fsync_file(path)
            sums[name] = _sha256(path)
        meta = {**meta, "format": FORMAT, "step": step, "sha256": sums}
        meta_path = tmp / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.chmod(meta_path, 0o600)
        _fsync_file(meta_path)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / ".LATEST.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.chmod(latest_tmp, 0o600)
        _fsync_file(latest_tmp)
        os.replace(latest_tmp, root / "LATEST")
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, final, keep)
    return final


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (``newest`` stays) and crashed saves."""
    old = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and p != newest)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-ckpt-*"):  # debris of a crashed save
        shutil.rmtree(p, ignore_errors=True)


def finish_interrupted_save(root: str | os.PathLike[str], keep: int = 1) -> None:
    """Do what a save killed after replacing ``LATEST`` left undone: remove the checkpoints
    older than the one ``LATEST`` names (beyond ``keep``) and any half-written one. Does
    nothing unless ``LATEST`` names a complete checkpoint."""
    root = Path(root)
    pointer = root / "LATEST"
    if not pointer.is_file():
        return
    newest = root / pointer.read_text().strip()
    if (newest / "meta.json").is_file():
        _prune(root, newest, keep)


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    ``LATEST`` names it; if that is missing or points nowhere (a crash between steps of a
    save), the newest ``ckpt-*`` with a ``meta.json`` is taken. Incomplete ones are skipped
    with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / "LATEST"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    for p in sorted(root.glob("ckpt-*"), reverse=True):
        if (p / "meta.json").is_file():
            return p
        warnings.warn(f"ignoring incomplete checkpoint {p} (no meta.json)", stacklevel=2)
    for p in root.glob(".tmp-ckpt-*"):
        warnings.warn(f"ignoring incomplete checkpoint {p} (a save that did not finish)",
                      stacklevel=2)
    return None


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint :func:`load` reads for ``path`` (a root, or one ``ckpt-*``).

    Raises:
        FileNotFoundError: no complete checkpoint there.
    """
    path = Path(path)
    ckpt = path if (path / "meta.json").is_file() else latest(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return ckpt


def load(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor],
                                                  dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: ``(model tensors, optimizer tensors, meta)``.

    ``path`` is a checkpoint root (its newest complete checkpoint is read) or one ``ckpt-*``.

    Raises:
        FileNotFoundError: no complete checkpoint there.
        CheckpointError: a truncated, corrupted or foreign file, naming it.
    """
    st = _safetensors()
    path = Path(path)
    ckpt = path if (path / "meta.json").is_file() else latest(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path} is unreadable or not JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a harmony checkpoint of format {FORMAT}")
    out = []
    for name in TENSOR_FILES:
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if _sha256(f) != meta.get("sha256", {}).get(name):
            raise CheckpointError(f"{f} is truncated or corrupted (its SHA-256 does not match "
                                  "meta.json); restore it or load an older checkpoint")
        try:
            out.append(st.load_file(f))
        except Exception as err:
            raise CheckpointError(f"{f} is not a valid safetensors file ({err})") from err
    return out[0], out[1], meta
