"""Byte-level BPE tokenizer trained on the train split, with a disk cache of it and of the
tokenized train/val streams.

Cache layout: CACHE/<source>-v<vocab>-<key>/{tokenizer.json, train.npy, val.npy}, where the key
hashes the source, the train and val file lists with their sizes and the vocabulary size. Each
file is written to a temporary file and renamed into place, so concurrent ranks or runs never
read half a file. Training is deterministic: the same input gives the same tokenizer.json, and
the same ids.
Shapes: a token stream is a 1-D numpy array [N], uint16 when the vocabulary fits, else uint32;
documents are joined as [EOT] doc0 [EOT] doc1 ... with EOT = "<|endoftext|>" = id 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moefold.config import ConfigError, DataConfig
from moefold.data.corpus import DocumentSplit, load_token_array, read_documents

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
_MIN_VOCAB = 257  # 256 byte symbols + the separator
_CACHE_FORMAT = 1  # bump when the cached bytes would change for the same inputs
_CHUNK_CHARS = 8192
# The GPT-2 pre-tokenizer always splits before " <letter>", so cutting documents there gives the
# same ids as encoding them whole, and is ~2.5x faster (the library is slow on very long inputs).
_SAFE_CUT = re.compile(r" (?=[A-Za-z])")


class TextTokenizer:
    """A trained byte-level BPE, or a model's own tokenizer (`load_pretrained_tokenizer`).
    Ids are 0..vocab_size-1; `eot_id` separates documents (EOT_ID, or the model's EOS)."""

    eot_id = EOT_ID
    pretrained = False  # True: a model's tokenizer.json, not one trained here

    def __init__(self, hf: Tokenizer) -> None:
        self.hf = hf

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TextTokenizer:
        """Load a tokenizer.json written by this module."""
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (can be below the requested size)."""
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; a literal "<|endoftext|>" becomes EOT_ID."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, separators included, so decode(encode(x)) == x."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


# Names a model's end-of-text token goes by, tried when tokenizer_config.json names none.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")


def pretrained_tokenizer_file(path: str | os.PathLike) -> Path | None:
    """tokenizer.json of a Hugging Face folder, of a converted checkpoint (CKPT/tokenizer/),
    or the file itself; None when there is none."""
    path = Path(path)
    for candidate in (path, path / "tokenizer.json", path / "tokenizer" / "tokenizer.json"):
        if candidate.is_file() and candidate.name == "tokenizer.json":
            return candidate
    return None


def load_pretrained_tokenizer(
    path: str | os.PathLike, field: str = "data.tokenizer"
) -> TextTokenizer:
    """A model's own tokenizer (tokenizer.json, with tokenizer_config.json's eos_token as the
    document separator), loaded with the `tokenizers` library; errors name `field` (the
    config field or CLI flag that gave `path`)."""
    file = pretrained_tokenizer_file(path)
    if file is None:
        raise ConfigError(
            f"{field}: {path} has no tokenizer.json; pass a Hugging Face model folder or "
            "a checkpoint made by `moefold convert --from-hf` (it keeps CKPT/tokenizer/)"
        )
    tokenizer = TextTokenizer(Tokenizer.from_file(str(file)))
    tokenizer.pretrained = True
    eos = None
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    for name in (eos, *_EOS_NAMES):
        if name and tokenizer.hf.token_to_id(name) is not None:
            tokenizer.eot_id = tokenizer.hf.token_to_id(name)
            return tokenizer
    raise ConfigError(
        f"{field}: {file} has no end-of-text token (tokenizer_config.json eos_token, or "
        f"one of {', '.join(_EOS_NAMES)}) to separate documents"
    )


def write_pretrained_files(tokenizer: TextTokenizer, out_dir: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that transformers' AutoTokenizer reads
    (PreTrainedTokenizerFast; its EOS is the document separator)."""
    eos = tokenizer.hf.id_to_token(tokenizer.eot_id)
    (out_dir / "tokenizer.json").write_text(tokenizer.hf.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def stream_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids below vocab_size."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE with `vocab_size` ids (EOT_ID first) on `docs`."""
    if vocab_size < _MIN_VOCAB:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is too small for a byte-level BPE; use at least "
            f"{_MIN_VOCAB} (256 bytes + {EOT_TOKEN})"
        )
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(docs, trainer)
    assert hf.token_to_id(EOT_TOKEN) == EOT_ID
    return TextTokenizer(hf)


def _cut(text: str) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > _CHUNK_CHARS:
        match = _SAFE_CUT.search(text, start + _CHUNK_CHARS)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer: TextTokenizer, docs: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """One stream [N]: the separator (tokenizer.eot_id) before every document, then its ids.
    A model's own tokenizer encodes whole documents (the cut below is exact for ours only)."""
    cut = (lambda doc: [doc]) if tokenizer.pretrained else _cut
    pieces = [cut(doc) for doc in docs]
    flat = [p for doc_pieces in pieces for p in doc_pieces]
    # encode_batch_fast (tokenizers >= 0.21) skips offsets; it runs on all cores.
    encode = getattr(tokenizer.hf, "encode_batch_fast", tokenizer.hf.encode_batch)
    encodings = iter(encode(flat, add_special_tokens=False))
    parts = []
    for doc_pieces in pieces:
        parts.append(np.array([tokenizer.eot_id], dtype=dtype))
        parts.extend(np.asarray(next(encodings).ids, dtype=dtype) for _ in doc_pieces)
    return np.concatenate(parts)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temp file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache_dir must stay readable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())


def cache_root(data_cfg: DataConfig) -> Path:
    """`data.cache_dir`, or ~/.cache/moefold when it is empty."""
    return Path(data_cfg.cache_dir or "~/.cache/moefold").expanduser()


def cache_dir(data_cfg: DataConfig, split: DocumentSplit, vocab_size: int) -> Path:
    """The cache folder of one (source, train/val files and sizes, vocab size) combination."""
    key = {
        "format": _CACHE_FORMAT,
        "source": data_cfg.source,
        "vocab_size": vocab_size,
        "train": [[str(p.resolve()), p.stat().st_size] for p in split.train],
        "val": [[str(p.resolve()), p.stat().st_size] for p in split.val],
    }
    if data_cfg.tokenizer:  # a model's tokenizer: its file is part of the key
        key["tokenizer"] = _file_digest(_pretrained_file(data_cfg))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(data_cfg) / f"{data_cfg.source.replace('+', '-')}-v{vocab_size}-{digest}"


def _pretrained_file(data_cfg: DataConfig) -> Path:
    file = pretrained_tokenizer_file(data_cfg.tokenizer)
    if file is None:
        load_pretrained_tokenizer(data_cfg.tokenizer)  # raises the ConfigError
        raise AssertionError("load_pretrained_tokenizer accepted a folder without a tokenizer")
    return file


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrained_for(data_cfg: DataConfig, vocab_size: int) -> TextTokenizer:
    """data.tokenizer, checked to fit model.vocab_size."""
    tokenizer = load_pretrained_tokenizer(data_cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"data.tokenizer: {data_cfg.tokenizer} has {tokenizer.vocab_size} ids, more than "
            f"model.vocab_size={vocab_size}; use the model's own tokenizer"
        )
    return tokenizer


def _train_and_cache(path: Path, train_docs: Sequence[str], vocab_size: int) -> TextTokenizer:
    tokenizer = train_tokenizer(train_docs, vocab_size)
    atomic_write(path, tokenizer.hf.to_str().encode())
    return tokenizer


def load_or_train_tokenizer(
    data_cfg: DataConfig, split: DocumentSplit, vocab_size: int
) -> TextTokenizer:
    """The cached tokenizer of this split, trained on split.train (and cached) on a miss."""
    if data_cfg.tokenizer:
        return pretrained_for(data_cfg, vocab_size)
    path = cache_dir(data_cfg, split, vocab_size) / "tokenizer.json"
    if path.is_file():
        return TextTokenizer.from_file(path)
    return _train_and_cache(path, read_documents(split.train), vocab_size)


def load_or_encode_streams(
    data_cfg: DataConfig, split: DocumentSplit, vocab_size: int
) -> tuple[TextTokenizer, np.ndarray, np.ndarray]:
    """(tokenizer, train stream [N_train], val stream [N_val]), read from the cache when there.

    Cached streams come back memory-mapped (read-only); a miss trains and encodes, then caches.
    """
    folder = cache_dir(data_cfg, split, vocab_size)
    tok_path, train_path, val_path = (
        folder / n for n in ("tokenizer.json", "train.npy", "val.npy")
    )
    pretrained = pretrained_for(data_cfg, vocab_size) if data_cfg.tokenizer else None
    if (pretrained or tok_path.is_file()) and train_path.is_file() and val_path.is_file():
        fix = f"delete {folder} and it is rebuilt"
        return (
            pretrained or TextTokenizer.from_file(tok_path),
            load_token_array(train_path, "data.cache_dir", fix),
            load_token_array(val_path, "data.cache_dir", fix),
        )
    train_docs = read_documents(split.train)
    logger.info(
        "tokenizing %d train / %d validation documents into %s",
        len(split.train),
        len(split.val),
        folder,
    )
    if pretrained is not None:
        tokenizer = pretrained
    elif tok_path.is_file():
        tokenizer = TextTokenizer.from_file(tok_path)
    else:
        tokenizer = _train_and_cache(tok_path, train_docs, vocab_size)
    dtype = stream_dtype(vocab_size)
    train_ids = encode_documents(tokenizer, train_docs, dtype)
    val_ids = encode_documents(tokenizer, read_documents(split.val), dtype)
    _save_array(train_path, train_ids)
    _save_array(val_path, val_ids)
    return tokenizer, train_ids, val_ids
