"""Atomic file writes: write to a temp file beside the target, fsync it, then rename over it.

A crash, a kill or a full disk leaves either the old file or the new one, never a half-written one. A SIGKILL can
still leave the temp file itself behind; temp files have one recognisable name,
``.<name>.prod9-tmp-<host>-<pid>-<random><suffix>``, and the first atomic write of a process into a folder removes
the ones there whose writer (same host, that pid) is no longer alive. Nothing else is ever deleted. A folder is
written the same way (:func:`atomic_dir`: built beside its place, renamed into it). Processes that would build the
same cached file take turns under :func:`exclusive` (one builds it, the others then read it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("prod9")

TEMP_MARK = ".prod9-tmp-"
# ".<name>" + TEMP_MARK + "<host>-<pid>-<8 random chars of mkstemp>" + suffix (e.g. ".tmp", ".npz", ".nii.gz")
TEMP_PATTERN = re.compile(r"^\..+" + re.escape(TEMP_MARK)
                          + r"(?P<host>[A-Za-z0-9]+)-(?P<pid>[0-9]+)-[a-z0-9_]{8}(\.[A-Za-z0-9]+)*$")
_cleaned: set[str] = set()  # folders this process has already swept


def _host() -> str:
    """This machine's name, letters and digits only (a pid means nothing on another host of a shared disk)."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, it belongs to someone else
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of killed atomic writes in ``folder``: names matching :data:`TEMP_PATTERN` whose
    host is this one and whose pid is not alive. Returns the removed paths (each logged)."""
    if os.name != "posix":  # os.kill(pid, 0) is no probe elsewhere
        return []
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or not readable: nothing of ours is in it
        return []
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if not match or match["host"] != _host() or _pid_alive(int(match["pid"])):
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:  # another process swept it first
            continue
        logger.info("removed %s, the temp file of a killed write (pid %s)", entry.path, match["pid"])
        removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    """:func:`remove_stale_temp_files` on the first write of this process into ``folder``."""
    key = os.path.abspath(folder)
    if key not in _cleaned:
        remove_stale_temp_files(folder)
        _cleaned.add(key)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; some filesystems refuse a directory fsync, which is harmless)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp path in ``path``'s folder; on success it is fsynced and renamed to ``path``, on error removed.

    Args:
        path: the final file (its folder is created).
        suffix: temp-file suffix, for writers that pick a format by extension (e.g. ``.nii.gz``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        prefix = f".{path.name}{TEMP_MARK}{_host()}-{os.getpid()}-"
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as error:  # name the folder, not a temp file the user never asked for
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionError(f"cannot write {path.name} into {path.parent}: {error.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        _fsync_file(tmp)  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # and the rename itself survives a power cut


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp folder beside ``path`` (named like the temp files); on success it is renamed to ``path`` (which
    must not exist, or be an empty folder), on error it is removed with what was written into it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}{TEMP_MARK}{_host()}-{os.getpid()}-", dir=path.parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        os.rename(tmp, path)  # refused if path appeared meanwhile with something in it: nothing is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp folder only
        raise
    _fsync_dir(path.parent)


@contextmanager
def exclusive(lock: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created empty if missing, its folder too) while the block runs;
    another process (or another ``exclusive`` of this one) waits for it. A POSIX ``flock``, so a killed holder
    releases it; where there is none (Windows) the block runs unlocked. The lock file is never removed: removing it
    while another process waits on it would let a third one in beside it.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the block runs unlocked
        yield
        return
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a link planted at the lock's name in a shared folder is refused, not followed to another file
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json(data, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
