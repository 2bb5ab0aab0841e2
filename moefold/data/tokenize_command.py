"""`moefold tokenize`: text files -> one token file (.npy) with a model's own tokenizer, for
`data.source=tokens` (fine-tuning a converted or upcycled model on its own vocabulary).

    moefold tokenize --tokenizer smollm2-ckpt --out sotu.npy 'corpus/*.txt'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moefold.config import ConfigError
from moefold.data.corpus import read_documents, resolve_files
from moefold.data.tokenizer import encode_documents, load_pretrained_tokenizer, stream_dtype


def add_tokenize_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `tokenize` on the CLI's sub-parsers."""
    parser = sub.add_parser(
        "tokenize",
        help="text files -> a token file with a model's tokenizer (for data.source=tokens)",
        description="Encode text files with a model's own tokenizer (a Hugging Face folder, its "
        "tokenizer.json, or a checkpoint of `moefold convert --from-hf` / `upcycle --format "
        "moefold`) into one .npy stream: the tokenizer's end-of-text id before each document, "
        "then its ids (uint16 when the vocabulary fits, else uint32).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".txt file, folder or glob")
    parser.add_argument("--tokenizer", required=True, help="HF folder, tokenizer.json or CKPT")
    parser.add_argument("--out", required=True, help="token file to write (.npy)")
    parser.set_defaults(run=run_tokenize)
    return parser


def tokenize_files(paths: list[str], tokenizer_path: str, out: Path) -> tuple[int, int]:
    """Write the token file; returns (documents, tokens)."""
    if out.suffix != ".npy":
        raise ConfigError(f"--out: {out} must end in .npy (data.source=tokens reads .npy/.bin)")
    tokenizer = load_pretrained_tokenizer(tokenizer_path, field="--tokenizer")
    files = [f for path in paths for f in resolve_files(path, (".txt",))]
    docs = read_documents(files)
    ids = encode_documents(tokenizer, docs, stream_dtype(tokenizer.vocab_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, ids)
    tmp.replace(out)
    return len(docs), int(ids.size)


def run_tokenize(args: argparse.Namespace) -> int:
    out = Path(args.out)
    docs, tokens = tokenize_files(args.paths, args.tokenizer, out)
    print(
        f"moefold: wrote {tokens} tokens of {docs} documents to {out}; train on them with "
        f"--set data.source=tokens --set data.path={out} --set data.tokenizer={args.tokenizer}"
    )
    return 0
