"""Safe file handling for run folders: one run per folder (a lock), atomic writes, and checks
that need no process group (writable, free space). run_dir.py decides a run's folder name.

`RunLock` holds an exclusive `flock` on OUT/.moefold.lock for the whole run and writes its pid,
host and start time into the file, so a second run into the folder stops at once and names the
holder. The kernel drops the lock when its process dies (SIGKILL included), so a lock file left
by a dead run is stale by construction and the next run simply takes it over. Every error names
the path and the operating system's cause (e.g. "No space left on device").
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from moefold.errors import RunFolderError

LOCK_FILE = ".moefold.lock"


def describe_os_error(path: Path | str, error: OSError) -> str:
    """'PATH: No space left on device (ENOSPC)': the path and the OS cause in one line."""
    name = errno.errorcode.get(error.errno or 0, "")
    cause = error.strerror or str(error)
    return f"{path}: {cause}" + (f" ({name})" if name else "")


def find_cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in an exception's cause/context chain, including the per-rank
    failures DCP's CheckpointException carries (DCP wraps the writer's and reader's errors)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind) and not (isinstance(current, OSError) and not current.errno):
            return current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        for value in getattr(current, "failures", {}).values():
            items = value if isinstance(value, tuple) else (value,)  # (error, traceback)
            pending += [e for e in items if isinstance(e, BaseException)]
    return None


def find_os_error(error: BaseException) -> OSError | None:
    found = find_cause(error, OSError)
    return found if isinstance(found, OSError) else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it into place; the
    temporary file is removed when anything fails."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(describe_os_error(path, error)) from error


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and prove a file can be written there."""
    probe = folder / f".moefold-probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(f"{flag}: {describe_os_error(folder, error)}") from error


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise RunFolderError(
            f"{folder}: {free / 2**20:.1f} MiB free, {what} needs about "
            f"{need_bytes / 2**20:.1f} MiB ({os.strerror(errno.ENOSPC)}); free space or "
            "choose another folder"
        )


class RunLock:
    """Exclusive lock on a run folder for the life of one run (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunFolderError(f"--out: {describe_os_error(self.path, error)}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunFolderError(
                f"--out {self.folder} is in use by another moefold run ({holder}); wait for "
                "it to finish or pass another --out"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on host {holder['host']}, since {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
