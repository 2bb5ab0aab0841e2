"""Per-file checksums of a checkpoint folder: written at save, verified before any load.

`checksums.json` lists every other file of the folder with its size and SHA-256. A flipped
byte anywhere (a garbled float inside a `.distcp` of unchanged size loads without a word
otherwise) makes `verify_checkpoint` raise a CheckpointError that names the file as damaged.
Folders written before moefold kept checksums have none; they load unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from moefold.errors import CheckpointError, CheckpointRefused

logger = logging.getLogger(__name__)

MANIFEST_FILE = "checksums.json"


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(folder: Path) -> Path:
    """Checksum every file in `folder` (not sub-folders) into folder/checksums.json."""
    files = {
        path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    return manifest


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file()


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the first damaged or missing file; warn without a manifest."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        logger.warning(
            "%s has no %s (written before checksums were kept): loading it unverified",
            folder,
            MANIFEST_FILE,
        )
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{manifest}: damaged ({error})") from error
    listed = {name for name, _, _ in entries}
    for path in folder.iterdir():
        if (path.suffix == ".distcp" or path.name == ".metadata") and path.name not in listed:
            raise CheckpointRefused(f"{path}: was not part of the checkpoint when saved (altered)")
    for name, size, digest in entries:
        path = folder / name
        if Path(name).name != name:
            raise CheckpointRefused(f"{manifest}: names {name!r} outside the folder (altered)")
        if not path.is_file():
            raise CheckpointError(f"{folder}: damaged: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path}: damaged: {path.stat().st_size} bytes, {size} when saved"
            )
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"{path}: damaged: its SHA-256 differs from the one recorded at save "
                f"({MANIFEST_FILE}); use an older checkpoint"
            )
