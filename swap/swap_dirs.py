"""The swap directories harmony makes under an ``nvme_dir``, and the sweep that may remove them.

Each :class:`swap.nvme.NvmeStore` works in a directory of its own, ``<root>/harmony-<pid>-<random>``
(mode 0700), which holds a marker file (:data:`MARKER`: the pid, the process's start time and
the boot it ran in) and a lock file the store holds with ``flock`` for its life. A later store
removes such a directory only when harmony provably made it and its run is gone: the name, a
valid marker for that pid, an owner that has ended (another boot, the pid gone, or the pid now
another process's, told by its start time), and no live lock. Anything else under the root, a
user's directory named like ours included, is never touched.

    check_root(root)          the nvme_dir a user gave, checked (ValueError naming it)
    remove_stale(root)        sweep the directories of dead runs
    make_private_dir(root)    a new directory with our marker
    lock_dir(directory)       held while the store lives (a sweep skips it)
    remove_tree(...)          the store's directory goes, in the process that made it only
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("harmony.swap")

_DIR_PATTERN = re.compile(r"harmony-(\d+)-[A-Za-z0-9_]+")
_LOCK_NAME = ".lock"
MARKER = ".harmony-swap"  # in each swap directory: who made it (pid, start time, boot)


def check_root(root: object) -> Path:
    """``root`` as a Path if it can hold the store's directory: a str or PathLike naming an
    existing, writable directory.

    Args:
        root: the ``nvme_dir`` a user gave.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: naming the value and what to give instead.

    Example:
        >>> check_root("/mnt/nvme")
        PosixPath('/mnt/nvme')
    """
    text = os.fspath(root) if isinstance(root, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise ValueError(f"nvme_dir={root!r} is not a path; give a directory (a str or "
                         "pathlib.Path), or None for no NVMe tier")
    if not text.strip():
        raise ValueError(f"nvme_dir={root!r} is empty (an unset environment variable?); give "
                         "the directory for the swap files, or None for no NVMe tier")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"nvme_dir {text!r} is a file, not a directory; give the directory "
                         f"that should hold harmony's swap files (such as {str(path.parent)!r})")
    if not path.is_dir():
        raise ValueError(
            f"nvme_dir {text!r} does not exist; create it (mkdir -p {path}) or pick another "
            "nvme_dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(
            f"nvme_dir {text!r} is not writable by this process; fix its permissions "
            f"(or remount it read-write) or pick another nvme_dir"
        )
    return path


def make_private_dir(root: Path) -> Path:
    """A new swap directory ``root/harmony-<pid>-<random>`` (mode 0700) holding our marker.

    Args:
        root: a directory :func:`check_root` accepted.

    Returns:
        The new directory.

    Raises:
        ValueError: it cannot be made (permissions, a read-only file system); the message
            names ``root``, the system's reason and what to do.

    Example:
        >>> directory = make_private_dir(Path("/mnt/nvme"))
        >>> (directory / MARKER).is_file()
        True
    """
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"harmony-{os.getpid()}-", dir=root))
        directory.chmod(0o700)
        # The marker proves to a later sweep that harmony made this directory and for whom.
        fd = os.open(directory / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps({"harmony": "swap", "pid": os.getpid(),
                                     "start": _process_start(os.getpid()),
                                     "boot": _boot_id()}).encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise ValueError(
            f"cannot create a swap directory in nvme_dir {str(root)!r}: {e.strerror}; make it "
            f"writable (permissions, or remount read-write) or pick another nvme_dir"
        ) from e
    return directory


def lock_dir(directory: Path) -> int:
    """Take ``directory``'s lock, to hold while a store works in it: another run's sweep
    skips a locked directory even when our pid means nothing to it (another pid namespace on
    the same disk).

    Args:
        directory: a directory from :func:`make_private_dir`.

    Returns:
        The lock's file descriptor; :func:`remove_tree` closes it.

    Raises:
        OSError: the lock file cannot be made, or another process holds the lock.

    Example:
        >>> fd = lock_dir(directory)
    """
    fd = os.open(directory / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_tree(directory: Path, lock_fd: int, owner: int) -> None:
    """Close the lock and remove the store's directory, in the process that made it only (a
    forked child, say a data-loader worker, that drops its copy of the store leaves it).

    Args:
        directory: the store's directory.
        lock_fd: the descriptor :func:`lock_dir` returned.
        owner: the pid of the process that made ``directory``.

    Example:
        >>> remove_tree(directory, fd, os.getpid())
    """
    with contextlib.suppress(OSError):
        os.close(lock_fd)
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _boot_id() -> str | None:
    """This boot's id (pids and start times restart with each boot); None where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, as text (so a reused pid is told apart from the one a
    marker names): ``/proc/<pid>/stat``'s start time, else psutil's; None where neither
    can tell (then only the pid is compared)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime, clock ticks)
    except (OSError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time()!r}"
    except Exception:  # gone, or not ours to ask about
        return None


def _marker(directory: Path) -> dict[str, object] | None:
    """The owner a swap directory's marker names, if it is a valid marker: a regular file
    (not a symlink) of ours holding harmony's JSON; else None (never swept)."""
    path = directory / MARKER
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size > 4096:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("harmony") != "swap" \
            or not isinstance(data.get("pid"), int):
        return None
    return data


def _owner_gone(marker: dict[str, object]) -> bool:
    """Whether the process a marker names has ended (a reboot since, its pid gone, or the pid
    now another process's, told by its start time)."""
    pid = marker["pid"]
    assert isinstance(pid, int)
    boot = _boot_id()
    if marker.get("boot") is not None and boot is not None and marker["boot"] != boot:
        return True
    if not _pid_alive(pid):
        return True
    start = _process_start(pid)
    if marker.get("start") is None or start is None:
        global _WARNED_NO_START
        if not _WARNED_NO_START:
            _WARNED_NO_START = True
            log.warning("harmony: cannot read process start times here (no /proc, no psutil: "
                        "pip install psutil); a swap directory whose pid was reused by another "
                        "process is kept until that process ends")
        return False
    return start != marker["start"]


_WARNED_NO_START = False


def remove_stale(root: Path) -> None:
    """Remove swap directories harmony made whose run is gone: named ``harmony-<pid>-*``,
    holding a valid marker for that pid whose owner has ended, and not locked by a live
    store. A directory without such a marker is never touched. What goes is logged in one
    warning line.

    Args:
        root: a directory :func:`check_root` accepted.

    Example:
        >>> remove_stale(Path("/mnt/nvme"))
    """
    removed: list[str] = []
    for entry in os.scandir(root):
        match = _DIR_PATTERN.fullmatch(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        directory = Path(entry.path)
        marker = _marker(directory)
        if marker is None or marker["pid"] != int(match.group(1)):
            continue
        if not _owner_gone(marker) or _locked(directory / _LOCK_NAME):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        log.warning(
            "harmony: removed %d swap director%s of dead runs under %s: %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            root,
            ", ".join(sorted(removed)),
        )


def _locked(lock_path: Path) -> bool:
    """Whether a live store holds ``lock_path`` (False if it is missing)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)

