"""All-or-nothing output folders for `moefold convert` and `moefold upcycle`: files are written
into a temporary folder beside `--out`, which becomes `--out` by one rename on success and is
deleted on failure, so a failed conversion leaves neither a half-written nor an empty `--out`.

The rename of a folder is atomic on POSIX file systems when source and target share a parent,
which is why the temporary folder is created beside the target and not in /tmp.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moefold.safe_io import describe_os_error


def check_output_dir(path: Path, what: str) -> None:
    """ValueError unless `path` is new or an empty folder (checked before any work is done)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        kind = "not empty" if path.is_dir() else "a file"
        raise ValueError(f"--out: {path} is {kind}; choose a new folder for the {what}")


def _missing_ancestors(path: Path) -> list[Path]:
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _os_error(error: OSError, path: Path) -> ValueError:
    return ValueError(f"--out: cannot write {describe_os_error(error.filename or path, error)}")


@contextmanager
def atomic_output_dir(path: str | Path, what: str) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it is renamed to `path`.

    On any exception the temporary folder (and any parent folders this call created) is
    removed and the exception re-raised; an OSError (disk full, permission denied) comes back
    as a ValueError naming the path and the operating system's reason.
    """
    path = Path(path)
    check_output_dir(path, what)
    created = _missing_ancestors(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    except OSError as error:
        _remove_empty(created)
        raise _os_error(error, path) from None
    try:
        yield tmp
        check_output_dir(path, what)  # someone may have written there meanwhile
        # Renaming onto an existing empty folder replaces it (POSIX rename(2)).
        os.rename(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(error, OSError):
            raise _os_error(error, path) from None
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return
