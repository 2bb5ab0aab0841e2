"""Packed fixed-length sequences for every data source, the seeded data-parallel batch loader
and the fixed validation micro-batches.

Shapes: a sequence is seq_len+1 token ids (inputs = seq[:-1], labels = seq[1:]); a micro-batch
is a LongTensor [micro_batch, seq_len+1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moefold.config import ConfigError, DataConfig
from moefold.data.corpus import document_split, read_token_files
from moefold.data.tokenizer import (
    TextTokenizer,
    load_or_encode_streams,
    load_or_train_tokenizer,
    pretrained_for,
    stream_dtype,
)

_U64 = 2**64 - 1
_SYNTHETIC_TOKENS = 2**20  # about 1M tokens whatever seq_len: enough for short CPU runs
# Each token has 4 successors taken with these probabilities: 1.75 bits, so the best reachable
# loss is about 1.21 nats (a little lower where a token's successors repeat).
_BRANCH_CDF = np.cumsum([0.5, 0.25, 0.125, 0.125])


class PackedDataset:
    """Non-overlapping windows of seq_len+1 tokens cut from one stream at stride seq_len.

    Window w is tokens[w*seq_len : w*seq_len + seq_len + 1]: the label of a window's last token
    is the first token of the next window. `windows` picks the windows in this set (all if None).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, windows: np.ndarray | None = None):
        self.tokens = tokens  # [N] any integer dtype, may be a read-only memmap
        self.seq_len = seq_len
        num_windows = max(0, (len(tokens) - 1) // seq_len)
        self.windows = np.arange(num_windows) if windows is None else np.asarray(windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.gather([index])[0]

    def gather(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Sequences at `indices` (positions in this set): LongTensor [len(indices), seq_len+1]."""
        starts = self.windows[np.asarray(indices, dtype=np.int64)] * self.seq_len
        rows = starts[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.int64))


def split_windows(
    tokens: np.ndarray, seq_len: int, every_nth: int
) -> tuple[PackedDataset, PackedDataset]:
    """(train, val) over one stream: window w is validation when w % every_nth == every_nth - 1."""
    windows = np.arange(max(0, (len(tokens) - 1) // seq_len))
    is_val = windows % every_nth == every_nth - 1
    train = PackedDataset(tokens, seq_len, windows[~is_val])
    val = PackedDataset(tokens, seq_len, windows[is_val])
    return train, val


def synthetic_stream(vocab_size: int, seq_len: int, seed: int, num_sequences: int) -> np.ndarray:
    """A stream [num_sequences*seq_len + 1] sampled from a fixed sparse Markov chain.

    The chain (4 successors per token) and the samples both come from `seed`. Window i of the
    stream is its own chain, sampled for all windows at once, so generation is one vectorised
    step per position; only each window's last label (the next chain's start) is unpredictable.
    """
    rng = np.random.default_rng([seed & _U64, 0x5E7])
    successors = rng.integers(0, vocab_size, size=(vocab_size, len(_BRANCH_CDF)))
    chains = np.empty((num_sequences, seq_len), dtype=stream_dtype(vocab_size))
    state = rng.integers(0, vocab_size, size=num_sequences)
    for t in range(seq_len):
        chains[:, t] = state
        branch = np.searchsorted(_BRANCH_CDF, rng.random(num_sequences), side="right")
        state = successors[state, branch]
    return np.append(chains.reshape(-1), chains.dtype.type(state[-1]))


def _text_datasets(data_cfg: DataConfig, vocab_size: int, seq_len: int):
    tokenizer, train_ids, val_ids = load_or_encode_streams(
        data_cfg, document_split(data_cfg), vocab_size
    )
    return PackedDataset(train_ids, seq_len), PackedDataset(val_ids, seq_len), tokenizer


def build_datasets(
    data_cfg: DataConfig, vocab_size: int, seq_len: int, seed: int
) -> tuple[PackedDataset, PackedDataset, TextTokenizer | None]:
    """(train, val, tokenizer) for `data_cfg.source`; the tokenizer is None for synthetic/tokens.

    Text sources split by document and train/load the cached BPE (see tokenizer.py); 'tokens'
    and 'synthetic' split by sequence (every data.val_every_nth-th is validation).
    """
    every_nth = data_cfg.val_every_nth
    if data_cfg.source == "synthetic":
        num_sequences = max(_SYNTHETIC_TOKENS // seq_len, 4 * every_nth)
        stream = synthetic_stream(vocab_size, seq_len, seed, num_sequences)
        train, val, tokenizer = *split_windows(stream, seq_len, every_nth), None
    elif data_cfg.source == "tokens":
        stream = read_token_files(data_cfg, vocab_size)
        train, val, tokenizer = *split_windows(stream, seq_len, every_nth), None
    else:
        train, val, tokenizer = _text_datasets(data_cfg, vocab_size, seq_len)
    if len(val) == 0:
        raise ConfigError(
            f"train.seq_len: the validation split has no sequence of seq_len+1={seq_len + 1} "
            "tokens; lower train.seq_len or data.val_every_nth, or add data"
        )
    return train, val, tokenizer


def load_tokenizer(data_cfg: DataConfig, vocab_size: int) -> TextTokenizer | None:
    """The tokenizer a text source trains with (from the cache, or retrained identically).

    None for 'synthetic' and 'tokens', whose ids have no text.
    """
    if data_cfg.tokenizer:  # a model's tokenizer also decodes token files made with it
        return pretrained_for(data_cfg, vocab_size)
    if data_cfg.source in ("synthetic", "tokens"):
        return None
    return load_or_train_tokenizer(data_cfg, document_split(data_cfg), vocab_size)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) so neighbouring seeds or epochs give unrelated permutations.
    words = np.random.SeedSequence([seed & _U64, epoch]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class BatchLoader:
    """Seeded, per-epoch shuffled global batches, cut into micro-batches for one dp rank.

    Global batch s of an epoch is positions [s*G, (s+1)*G) of that epoch's permutation
    (torch.Generator seeded by (seed, epoch)); an epoch's tail shorter than G is dropped.
    Micro-batch m holds sequences [m*mb, (m+1)*mb) of the global batch and dp rank r gets
    m = j*dp_size + r (j = 0, 1, ...), so at micro step j the dp ranks together hold
    micro-batches j*dp_size .. j*dp_size + dp_size - 1. The state counts global sequences,
    so a state saved under one dp_size resumes exactly under another.

    Args:
        dataset: has __len__ and gather(indices) -> LongTensor [len(indices), seq_len+1].
    """

    def __init__(
        self,
        dataset,
        global_batch: int,
        micro_batch: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        if global_batch % (micro_batch * dp_size):
            raise ConfigError(
                f"train.global_batch: {global_batch} is not divisible by "
                f"micro_batch*dp={micro_batch}*{dp_size}; change global_batch or micro_batch"
            )
        if len(dataset) < global_batch:
            raise ConfigError(
                f"train.global_batch: the train set has {len(dataset)} sequences, fewer than "
                f"one global batch of {global_batch}; lower train.global_batch or "
                "train.seq_len, or add data"
            )
        self.dataset, self.seed = dataset, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._perm = (self.epoch, torch.randperm(len(self.dataset), generator=generator))
        return self._perm[1]

    def next_batch(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch, each [micro_batch, seq_len+1]."""
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        ids = self._permutation()[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        mine = ids.view(-1, self.micro_batch)[self.dp_rank :: self.dp_size]
        return [self.dataset.gather(m.numpy()) for m in mine]

    def state_dict(self) -> dict[str, int]:
        """Plain ints, independent of dp_rank and dp_size: where the next global batch starts."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_sequences": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the last global batch that `state` had handed out."""
        if state["seed"] != self.seed or state["num_sequences"] != len(self.dataset):
            raise ConfigError(
                f"train.seed: the data state was saved with seed={state['seed']} over "
                f"{state['num_sequences']} sequences, now seed={self.seed} over "
                f"{len(self.dataset)}; resume with the same train.seed, data and train.seq_len"
            )
        assert 0 <= state["position"] <= len(self.dataset), state
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(
    dataset, micro_batch: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1
) -> list[torch.Tensor]:
    """The first num_batches*micro_batch validation sequences, in order, as micro-batches.

    Rank r gets micro-batches r, r + dp_size, ... (the BatchLoader interleaving), so the same
    sequences are evaluated at any dp_size. Each is a LongTensor [micro_batch, seq_len+1].
    """
    if num_batches % dp_size:
        raise ConfigError(
            f"train.eval_batches: {num_batches} is not a multiple of the data-parallel size "
            f"{dp_size}; pick a multiple so every rank evaluates as many batches"
        )
    if num_batches * micro_batch > len(dataset):
        raise ConfigError(
            f"train.eval_batches: the validation set has {len(dataset)} sequences, fewer than "
            f"eval_batches*micro_batch={num_batches}*{micro_batch}; lower train.eval_batches"
        )
    ids = np.arange(num_batches * micro_batch).reshape(num_batches, micro_batch)
    return [dataset.gather(row) for row in ids[dp_rank::dp_size]]
