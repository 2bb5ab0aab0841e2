"""Data pipeline: corpora, the cached byte-level BPE, packed sequences and the dp batch loader."""

from moefold.data.corpus import DocumentSplit, document_split, read_documents, source_files
from moefold.data.loader import (
    BatchLoader,
    PackedDataset,
    build_datasets,
    eval_batches,
    load_tokenizer,
    synthetic_stream,
)
from moefold.data.tokenizer import (
    EOT_ID,
    EOT_TOKEN,
    TextTokenizer,
    load_pretrained_tokenizer,
    train_tokenizer,
    write_pretrained_files,
)

__all__ = [
    "EOT_ID",
    "EOT_TOKEN",
    "BatchLoader",
    "DocumentSplit",
    "PackedDataset",
    "TextTokenizer",
    "build_datasets",
    "document_split",
    "eval_batches",
    "load_pretrained_tokenizer",
    "load_tokenizer",
    "read_documents",
    "source_files",
    "synthetic_stream",
    "train_tokenizer",
    "write_pretrained_files",
]
