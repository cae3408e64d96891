"""Atomic file writes: a crash or Ctrl-C never leaves a half-written output behind.

A `kill -9` or power cut can still leave the temporaries these writers use (`.name.XXXXXXXX.tmp`
files, `.name.XXXXXXXX` and `.name.old` folders); `remove_stale_temporaries` and `recover_dir` clean
or promote them on the next run, and `FolderLock` makes sure no other run is writing there meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from library.errors import ConfigError

log = logging.getLogger("pentadactyl")


def _write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError  # it reports a full disk as its own error, not OSError

    return OSError, SafetensorError


WRITE_ERRORS = _write_errors()  # what a failed write of one of our files raises


def write_error_reason(exc: BaseException) -> str:
    """The operating system's words for a failed write ('No space left on device'), not a Rust debug dump."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r'message: "([^"]+)"', str(exc))
    return found.group(1) if found else str(exc)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto `path` on success.

    The temporary file lives beside the target so the final `os.replace` is atomic on one file system.
    On failure the temporary file is removed and the previous `path` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) replace the file: set normal permissions last
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; give the folder normal permissions
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are made contiguous first)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# mkstemp/mkdtemp put 8 characters of [a-z0-9_] between the prefix and the suffix
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}|old)$")


def recover_dir(path: str | os.PathLike, is_complete: Callable[[Path], bool]) -> Path | None:
    """Finish an `atomic_dir` replacement that a crash cut short; returns what was promoted, or None.

    `atomic_dir` renames the old folder to `.name.old`, then the finished temporary onto `name`. A crash
    between the two renames leaves no `name` at all: the newest complete temporary (else `.name.old`)
    becomes `name` again. Leftovers beside an intact `name` are removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return None
    leftovers = [p for p in path.parent.iterdir() if p.is_dir() and (m := _TEMP_DIR.match(p.name))
                 and m.group("name") == path.name]
    promoted = None
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        # the temporaries first (newest first): one that is complete was written after `.old`
        candidates = sorted((p for p in leftovers if p != old), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates += [old] if old in leftovers else []
        promoted = next((p for p in candidates if is_complete(p)), None)
        if promoted is not None:
            os.replace(promoted, path)
    for p in leftovers:
        if p != promoted:
            shutil.rmtree(p, ignore_errors=True)
    return path if promoted is not None else None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that interrupted atomic writes left in `folder`.

    Call it only while holding the folder's `FolderLock`: a temporary of a write in progress looks the same.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.is_file() and _TEMP_FILE.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.is_dir() and _TEMP_DIR.match(p.name) and (folder / _TEMP_DIR.match(p.name).group("name")).exists():
            shutil.rmtree(p, ignore_errors=True)  # beside a complete folder (recover_dir handles the others)
            removed.append(p)
    return removed


def check_writable_folder(folder: str | os.PathLike, key: str) -> Path:
    """Create `folder` if needed and prove a file can be written there, before hours of work depend on it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason = "a file of that name (or above it) is in the way"
        raise ConfigError(f"{key} = \"{folder}\": cannot write there ({reason}). Choose a folder you can "
                          "write to, or fix its permissions / free the disk, then run again.") from None
    return folder


class FolderLock:
    """An exclusive lock on an output folder, so that two runs never overwrite each other's files.

    The lock is `flock` on `.pentadactyl.lock`: the kernel drops it when the process dies, so a file left by a
    crashed run is stale, never blocking. The file says who holds it, for the refusal message.
    """

    NAME = ".pentadactyl.lock"

    def __init__(self, folder: str | os.PathLike, key: str = "output_dir"):
        self.folder, self.key = Path(folder), key
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(
                        f"{self.key} = \"{self.folder}\" is in use by another run ({self._holder()}); two runs in "
                        "one folder would overwrite each other's files. Wait for it to finish, stop it, or give this "
                        "run another output_dir.") from None
                log.warning(f"cannot lock {self.path} ({exc.strerror}); make sure no other run uses {self.folder}")
                return self
            # the holder before us may have removed the file between our open and our lock: lock the live one
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        stale = self._holder(fd)
        if stale:
            log.info(f"{self.path}: taking over the lock of a run that ended without removing it ({stale})")
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return self

    def _holder(self, fd: int | None = None) -> str:
        """Who the lock file names ('' when it names nobody)."""
        try:
            text = os.pread(fd, 4096, 0).decode() if fd is not None else self.path.read_text()
            info = json.loads(text or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "" if fd is not None else "its lock file is being written"
        return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can be waiting on this file's lock
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
