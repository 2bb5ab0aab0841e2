"""Reading a DCP checkpoint without running code from it.

DCP's FileSystemReader unpickles `.metadata` with plain `pickle.load` and its default planner
loads non-tensor entries with `torch.load(weights_only=False)`: a crafted checkpoint folder
runs whatever it likes the moment it is read. `SafeFileSystemReader` unpickles the metadata
with a restricted unpickler that resolves only the classes DCP's metadata is made of (an
allow-list: every other global is refused, so no callable an attacker names is ever reached),
and `SafeLoadPlanner` loads the remaining pickled entries with `weights_only=True`. Written by
hand because torch offers no safe metadata reader: `weights_only` unpickling
(torch.serialization) accepts only tensor containers, not DCP's dataclasses.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from moefold.errors import CheckpointError, CheckpointRefused

METADATA_FILE = ".metadata"

# (module, name) pairs DCP's metadata pickles reference (torch 2.x), all plain data holders.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not DCP metadata")


def read_metadata(folder: Path) -> Metadata:
    """The checkpoint's DCP metadata, unpickled safely; CheckpointError names a refused file."""
    path = Path(folder) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror or error})") from error
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as error:
        raise CheckpointRefused(
            f"{path}: refused to load: {error}; a checkpoint's metadata holds only DCP's own "
            "classes, so this file was altered or crafted (loading it could run code)"
        ) from error
    except Exception as error:  # truncated or garbled pickle: any of a dozen types
        raise CheckpointError(f"{path}: damaged ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    _check_storage_paths(path, metadata)
    return metadata


def _check_storage_paths(path: Path, metadata: Metadata) -> None:
    """Every data file the metadata names is a plain file name inside the folder."""
    for info in (metadata.storage_data or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if not relative or PurePath(relative).name != relative or relative in (".", ".."):
            raise CheckpointRefused(
                f"{path}: names the data file {relative!r} outside the checkpoint folder; "
                "refused (altered or crafted metadata)"
            )


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by moefold
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a non-tensor entry must pass `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointRefused(
                f"entry {read_item.dest_index.fqn}: refused to load ({error}); only tensors "
                "and plain values are allowed"
            ) from error
        # The same bytes proved to reference only safe globals, so DCP's own (unrestricted)
        # load below resolves the same ones; it also restores the state dict's nesting.
        super().load_bytes(read_item, io.BytesIO(data))


def load_arguments(folder: Path) -> dict[str, Any]:
    """Keyword arguments for dcp.load that read `folder` safely."""
    return {"storage_reader": SafeFileSystemReader(str(folder)), "planner": SafeLoadPlanner()}
