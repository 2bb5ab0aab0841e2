"""Reading a Hugging Face folder's files safely: JSON files, and safetensors weights (one file
or a sharded index) whose paths must stay inside the folder and whose headers must parse.

Every problem is a ValueError naming the file and the fix; nothing here builds a model. Only the
headers are read when a folder is opened; tensors are read one at a time on request.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json_object(file: Path) -> dict:
    """The JSON object in `file`; ValueError naming the file when it is not one."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error}); restore the original file") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a weight file may resolve to: the folder itself, and for a huggingface_hub cache
    snapshot (`models--x/snapshots/<rev>`, whose files are symlinks to `../../blobs/<hash>`)
    that repository's blobs folder, so that cached downloads keep working."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def resolve_weight_file(folder: Path, name: object, source: Path) -> Path:
    """The path of weight file `name` (as written in `source`) inside `folder`.

    Refuses absolute paths, `..` components and symlinks that lead out of the folder: a
    downloaded folder must not make moefold read files elsewhere on the machine.
    """
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise ValueError(
            f"{source}: weight file {name!r} is not a .safetensors file name; "
            "restore the folder's original index"
        )
    relative = PurePosixPath(name)
    if relative.is_absolute() or Path(name).is_absolute() or ".." in relative.parts:
        raise ValueError(
            f"{source}: weight file {name!r} points outside {folder}; "
            "an index may only name files inside its own folder"
        )
    path = folder / relative
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ValueError(
            f"{source}: weight file {name!r} resolves to {target}, outside {folder} "
            "(a symlink leading out of the folder); copy the file into the folder"
        )
    if not target.is_file():
        raise ValueError(f"{source}: weight file {name!r} is missing from {folder}")
    return path


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{file}: not a readable safetensors file ({error}); re-download or re-export it"
        ) from None


class SafetensorsFolder:
    """One-tensor-at-a-time reads from an HF folder (model.safetensors or a sharded index);
    remembers which keys were read so unmapped tensors can be reported.

    Opening parses every weight file's header (not its data), so a malformed file, a missing
    shard or a key the index places in the wrong file fails here, before anything is built.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        self._handles: dict[Path, object] = {}
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: 'weight_map' must be a non-empty object")
            self.file_of = {
                key: resolve_weight_file(self.path, name, index) for key, name in weight_map.items()
            }
        elif single.is_file() or single.is_symlink():
            file = resolve_weight_file(self.path, SINGLE_FILE, single)
            self.file_of = dict.fromkeys(self._handle(file).keys(), file)
        else:
            raise ValueError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE};"
                " moefold reads safetensors folders (save_pretrained's default)"
            )
        for file in sorted(set(self.file_of.values())):
            present = set(self._handle(file).keys())
            listed = [key for key, owner in self.file_of.items() if owner == file]
            absent = [key for key in listed if key not in present]
            if absent:
                raise ValueError(
                    f"{index}: {file.name} holds no tensor {absent[0]} "
                    f"({len(absent)} listed keys missing); the index does not match its shards"
                )
        self.read_keys: set[str] = set()

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor `key` as its file's header states it (no data is read)."""
        return tuple(self._handle(self.file_of[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise ValueError(
                f"{self.path}: tensor {key} is missing; the folder does not match its config.json"
            )
        file = self.file_of[key]
        self.read_keys.add(key)
        try:
            return self._handle(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"{file}: tensor {key} cannot be read ({error})") from None

    def unread_keys(self) -> list[str]:
        return sorted(set(self.file_of) - self.read_keys)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
