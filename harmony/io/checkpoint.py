"""Checkpoint files: safetensors for tensors, JSON for the rest, replaced atomically.

A checkpoint directory ``root`` holds complete checkpoints ``root/ckpt-<step>/`` and a file
``root/LATEST`` naming the newest.

**Writers** (:func:`save`, :func:`finish_interrupted_save`) hold an exclusive ``fcntl.flock``
on ``root/.lock`` for the whole save, so two processes saving into one directory take turns.
Under the lock a writer first clears the debris of writers that died (half-written
``.tmp-ckpt-*`` folders: nobody else can be writing them), writes the new checkpoint under a
temporary name, fsyncs every file, renames it into place, fsyncs the directory, then replaces
``LATEST`` the same way and only then removes older checkpoints. A crash at any moment leaves
a complete checkpoint that :func:`latest` finds (when a step is saved twice, ``LATEST`` names
the new copy while the old one is moved aside). ``meta.json`` is written last and carries the
SHA-256 of every tensor file, so a truncated or corrupted file is detected on load.

**Readers** (:func:`latest`, :func:`load`) take no lock and never delete or rename anything:
an evaluation job may load while a training job saves. A reader opens a checkpoint's files
before reading them, so a writer pruning it meanwhile cannot pull them away (a checkpoint
pruned between choosing it and opening it is chosen again). Names read from ``LATEST`` must
resolve to a checkpoint inside ``root`` (no ``..``, absolute paths or symlinks leading out),
and ``meta.json`` is checked field by field (:func:`check_meta`). Loading never unpickles
anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from harmony.io import tensor_files
from harmony.io.tensor_files import FileTensors, Streamed

FORMAT = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
LOCK_NAME = ".lock"  # the writers' lock file in a checkpoint directory
_CKPT = re.compile(r"ckpt-\d+")  # what writers name checkpoints (and may prune)
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-ckpt-", ".trash-ckpt-"
_OPEN_ATTEMPTS = 20  # a reader's tries when writers keep pruning the checkpoint it chose


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path | int) -> str:
    """The SHA-256 of a file, by path or of an open file descriptor (read from offset 0)."""
    h = hashlib.sha256()
    if isinstance(path, int):
        offset = 0
        while block := os.pread(path, 1 << 20, offset):
            h.update(block)
            offset += len(block)
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_safetensors(tensors: Mapping[str, torch.Tensor] | Streamed, path: Path,
                      metadata: dict[str, str] | None = None, todo: str = "") -> None:
    """Write ``tensors`` (a dict, or a :class:`~harmony.io.tensor_files.Streamed` producer) as the
    safetensors file ``path``, one tensor in memory at a time
    (:func:`harmony.io.tensor_files.write_safetensors`; a test's hook replaces this name).

    Raises:
        OSError: the file could not be written (``ENOSPC`` when the disk is full), naming
            ``path``, the bytes the file needs and ``todo`` (what the caller's user should do).
            A partial file may remain: the caller writes under a temporary name and removes
            it.
    """
    tensor_files.write_safetensors(path, tensors, metadata, todo)


# -- the writers' lock ----------------------------------------------------------------------

@contextlib.contextmanager
def writer_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive writer lock of checkpoint directory ``root`` (``root/.lock``, an
    ``fcntl.flock`` released when the process ends, however it ends); waits for another
    writer to finish first.

    Example::

        with writer_lock("ckpt"):
            ...  # no other writer changes ckpt/ meanwhile
    """
    fd = os.open(Path(root) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


# -- names ------------------------------------------------------------------------------------

def _inside(root: Path, name: str, what: str) -> Path:
    """``root / name`` where ``name`` is one plain entry of ``root`` that does not lead out
    of it (through ``..``, an absolute path or a symlink); else CheckpointError naming it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{what} names {name!r}, which is not an entry of {root}; a "
                              f"checkpoint directory's names stay inside it: fix or remove "
                              f"{what}")
    path = root / name
    real_root, real = root.resolve(), path.resolve()
    if real.parent != real_root:
        raise CheckpointError(f"{what} names {name!r}, which leads to {real}, outside {root} "
                              "(a symlink?); a checkpoint directory's names stay inside it: "
                              "copy the checkpoint in instead of linking it")
    return path


def _pointer(root: Path) -> str | None:
    """The name ``root/LATEST`` holds (None if there is none)."""
    try:
        return (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{root / 'LATEST'} is unreadable ({err})") from err


def _entries(root: Path, prefix: str) -> list[Path]:
    """The directories (not symlinks) directly in ``root`` whose names writers made: complete
    checkpoints (``prefix="ckpt-"``) or temporary ones, sorted by name."""
    out = []
    for entry in os.scandir(root):
        made = _CKPT.fullmatch(entry.name) if prefix == "ckpt-" \
            else entry.name.startswith(prefix)
        if made and entry.is_dir(follow_symlinks=False):
            out.append(Path(entry.path))
    return sorted(out)


# -- writing ----------------------------------------------------------------------------------

def save(root: str | os.PathLike[str], step: int,
         model: Mapping[str, torch.Tensor] | Streamed,
         optimizer: Mapping[str, torch.Tensor] | Streamed, meta: dict[str, Any],
         keep: int = 1) -> Path:
    """Write a checkpoint for ``step`` under ``root`` atomically; returns its directory.

    ``model`` and ``optimizer`` are dicts of tensors, or :class:`~harmony.io.tensor_files.Streamed`
    producers: either way the files are written one tensor at a time.

    Holds the directory's writer lock throughout (:func:`writer_lock`), so concurrent savers
    take turns; removes what writers that died left, and all but the ``keep`` newest
    checkpoints once the new one is in place.

    Raises:
        OSError: the disk is full or not writable; the previous checkpoint is left intact and
            the partial one is removed.

    Example::

        save("ckpt", 100, {"w": torch.zeros(3)}, {}, {"note": "x"})  # -> ckpt/ckpt-000000100
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with writer_lock(root):
        _clear_debris(root)
        final = _write(root, step, model, optimizer, meta)
        _prune(root, final, keep)
    return final


def _write(root: Path, step: int, model: Mapping[str, torch.Tensor] | Streamed,
           optimizer: Mapping[str, torch.Tensor] | Streamed, meta: dict[str, Any]) -> Path:
    """The new checkpoint, complete and named by ``LATEST`` (writer lock held)."""
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    final = root / f"ckpt-{step:09d}"
    try:
        os.chmod(tmp, 0o700)
        sums = {}
        for name, tensors in zip(TENSOR_FILES, (model, optimizer)):
            path = tmp / name
            write_safetensors(tensors, path, todo=f"free space in {root} or save elsewhere; "
                                                  "the previous checkpoint is intact")
            os.chmod(path, 0o600)
            _fsync_file(path)
            sums[name] = _sha256(path)
        meta = {**meta, "format": FORMAT, "step": step, "sha256": sums}
        meta_path = tmp / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.chmod(meta_path, 0o600)
        _fsync_file(meta_path)
        _fsync_dir(tmp)
        if os.path.lexists(final):  # this step saved before: LATEST names the new copy while
            _point_latest(root, tmp.name)  # the old one moves aside
            os.replace(final, tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=root))
            _fsync_dir(root)
        os.replace(tmp, final)
        _fsync_dir(root)
        _point_latest(root, final.name)
    except BaseException:
        try:
            named = _pointer(root)
        except CheckpointError:
            named = None
        if named != tmp.name:  # (else it is the one complete checkpoint: kept)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _point_latest(root: Path, name: str) -> None:
    latest_tmp = root / ".LATEST.tmp"
    latest_tmp.write_text(name + "\n")
    os.chmod(latest_tmp, 0o600)
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / "LATEST")
    _fsync_dir(root)


def _clear_debris(root: Path) -> None:
    """Remove what writers that died left: temporary checkpoints (but one ``LATEST`` names)
    and checkpoints moved aside. Only under the writer lock: nobody else writes them."""
    named = _pointer(root)
    for p in _entries(root, _TMP_PREFIX) + _entries(root, _TRASH_PREFIX):
        if p.name != named:
            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (root / ".LATEST.tmp").unlink()


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (``newest`` stays) and the debris of
    writers (writer lock held)."""
    old = [p for p in _entries(root, "ckpt-") if p != newest]
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    _clear_debris(root)


def finish_interrupted_save(root: str | os.PathLike[str], keep: int = 1) -> None:
    """Do what a save killed before its end left undone, as a writer (under the lock): remove
    half-written checkpoints and, if ``LATEST`` names a complete checkpoint, the checkpoints
    older than it beyond ``keep``. :func:`save` does this itself; call it where a run that
    resumed has nothing new to save. Readers (:func:`load`) never do.

    Example::

        finish_interrupted_save("ckpt")
    """
    root = Path(root)
    if not root.is_dir():
        return
    with writer_lock(root):
        newest = latest(root)
        if newest is not None and _CKPT.fullmatch(newest.name):
            _prune(root, newest, keep)
        else:
            _clear_debris(root)


# -- reading ----------------------------------------------------------------------------------

def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    ``LATEST`` names it; if that is missing or points nowhere (a crash between steps of a
    save), the newest ``ckpt-*`` with a ``meta.json`` is taken. Incomplete ones are skipped
    with a warning. Changes nothing.

    Raises:
        CheckpointError: ``LATEST`` names something outside ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for _ in range(_OPEN_ATTEMPTS):
        name = _pointer(root)
        if name is not None:
            candidate = _inside(root, name, f"{root / 'LATEST'}")
            if (candidate / "meta.json").is_file():
                return candidate
        for p in reversed(_entries(root, "ckpt-")):
            if (p / "meta.json").is_file():
                return p
            if not (p / "meta.json").exists() and _pointer(root) == name:
                warnings.warn(f"ignoring incomplete checkpoint {p} (no meta.json)",
                              stacklevel=2)
        # Nothing complete seen. A writer that moved LATEST on and pruned the checkpoint it
        # named while we looked (a directory listing is no snapshot) changed LATEST: look
        # again. Unchanged, there is none.
        if _pointer(root) == name:
            break
    for p in _entries(root, _TMP_PREFIX):
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


def load(path: str | os.PathLike[str]) -> tuple[FileTensors, FileTensors, dict[str, Any]]:
    """Read and verify a checkpoint: ``(model tensors, optimizer tensors, meta)``.

    The tensors are mappings of key -> tensor that read each tensor from its file when it is
    looked up (:class:`harmony.io.tensor_files.FileTensors`; ``dict(...)`` reads them all),
    so a checkpoint larger than host memory is applied one tensor at a time.

    ``path`` is a checkpoint root (its newest complete checkpoint is read) or one ``ckpt-*``.
    Every file's SHA-256 is checked and ``meta.json`` is checked field by field
    (:func:`check_meta`). Deletes and renames nothing.

    Raises:
        FileNotFoundError: no complete checkpoint there.
        CheckpointError: a truncated, corrupted or foreign file, or a name leading outside the
            checkpoint directory, naming it.

    Example::

        weights, optimizer_state, meta = load("ckpt")
    """
    path = Path(path)
    for attempt in range(_OPEN_ATTEMPTS):
        direct = (path / "meta.json").is_file()
        ckpt = path if direct else latest(path)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}")
        try:
            with _opened(ckpt) as fds:
                return _read(ckpt, fds)
        except FileNotFoundError as err:
            if not direct and attempt < _OPEN_ATTEMPTS - 1:
                continue  # a writer pruned it after we chose it: LATEST names a newer one
            if (ckpt / "meta.json").is_file():
                raise CheckpointError(f"{err.filename} is missing") from None
            raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _opened(ckpt: Path) -> Iterator[dict[str, int]]:
    """File descriptors of a checkpoint's files (open files stay readable even if a writer
    prunes them); FileNotFoundError if one is gone."""
    fds: dict[str, int] = {}
    try:
        for name in ("meta.json", *TENSOR_FILES):
            fds[name] = os.open(_inside(ckpt, name, f"{ckpt / name}"), os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _read(ckpt: Path, fds: dict[str, int]) -> tuple[FileTensors, FileTensors, dict[str, Any]]:
    meta_path = ckpt / "meta.json"
    try:
        with os.fdopen(os.dup(fds["meta.json"]), "rb") as stream:
            meta = json.loads(stream.read())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path} is unreadable or not JSON ({err})") from err
    check_meta(meta, meta_path)
    out = []
    for name in TENSOR_FILES:
        f, fd = ckpt / name, fds[name]
        if _sha256(fd) != meta["sha256"][name]:
            raise CheckpointError(f"{f} is truncated or corrupted (its SHA-256 does not match "
                                  "meta.json); restore it or load an older checkpoint")
        # Read a tensor at a time when looked up (a checkpoint may exceed host memory),
        # through the open descriptor: the bytes just hashed, even if the file is pruned.
        try:
            out.append(FileTensors(f, fd))
        except ValueError as err:
            raise CheckpointError(f"{f} is not a valid safetensors file ({err})") from err
    return out[0], out[1], meta


# -- meta.json ----------------------------------------------------------------------------------

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_meta(meta: object, where: str | os.PathLike[str]) -> None:
    """Check the fields every checkpoint's ``meta.json`` (read from ``where``) has: its format,
    step and the SHA-256 of each tensor file.

    Raises:
        CheckpointError: naming the field, its value and what was expected.

    Example::

        check_meta({"format": 1, "step": 3, "sha256": {...}}, "ckpt/ckpt-000000003/meta.json")
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a harmony checkpoint of format {FORMAT}")
    if not _is_int(meta.get("step")) or meta["step"] < 0:
        raise _bad(meta, "step", "an int >= 0", where)
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or any(not isinstance(sums.get(n), str)
                                         for n in TENSOR_FILES):
        raise _bad(meta, "sha256", f"a hex digest for each of {', '.join(TENSOR_FILES)}", where)


def check_training_meta(meta: dict[str, Any], where: str | os.PathLike[str]) -> None:
    """Check the fields a :class:`harmony.Trainer` writes into ``meta.json`` (its step count,
    seed, optimizer and scheduler state, precision and plan), so that loading cannot fail
    half-way.

    Raises:
        CheckpointError: naming the field, its value and what was expected.

    Example::

        check_training_meta(load("ckpt")[2], "ckpt")
    """
    if not _is_int(meta.get("step_count")) or meta["step_count"] < 0:
        raise _bad(meta, "step_count", "an int >= 0", where)
    if not _is_int(meta.get("seed")):
        raise _bad(meta, "seed", "an int", where)
    if not isinstance(meta.get("optimizer_scalars"), dict):
        raise _bad(meta, "optimizer_scalars", "an object (parameter/state name -> value)",
                   where)
    groups = meta.get("optimizer_groups")
    if not isinstance(groups, list) or any(
            not isinstance(g, list) or any(not isinstance(d, dict) for d in g) for g in groups):
        raise _bad(meta, "optimizer_groups",
                   "a list (per pack) of lists of parameter-group settings", where)
    if meta.get("lr_scheduler") is not None and not isinstance(meta["lr_scheduler"], dict):
        raise _bad(meta, "lr_scheduler", "an object or null", where)
    precision = meta.get("precision")
    if precision is not None and not (
            isinstance(precision, dict) and precision.get("precision") in ("fp32", "bf16", "fp16")
            and _is_number(precision.get("scale")) and _is_int(precision.get("good_steps"))):
        raise _bad(meta, "precision", "null or {precision: fp32|bf16|fp16, scale, good_steps}",
                   where)
    if meta.get("optimizer") is not None and not isinstance(meta["optimizer"], str):
        raise _bad(meta, "optimizer", "the optimizer's class name", where)
    if meta.get("plan") is not None and not isinstance(meta["plan"], dict):
        raise _bad(meta, "plan", "an object or null", where)


def _bad(meta: dict[str, Any], field: str, expected: str,
         where: str | os.PathLike[str]) -> CheckpointError:
    shown = f"{meta[field]!r}"[:80] if field in meta else "missing"
    return CheckpointError(f"{where}: meta.json's {field} is {shown}, expected {expected}; the "
                           "file was edited or is not a harmony checkpoint: restore it or load "
                           "an older checkpoint")
