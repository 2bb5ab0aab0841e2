"""`moefold generate`: sample text from a checkpoint so a user can read what the model learned."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from moefold.checkpoint import CONFIG_FILE, load_checkpoint, resolve_checkpoint
from moefold.config import ConfigError, load_job
from moefold.data import TextTokenizer, load_pretrained_tokenizer, load_tokenizer
from moefold.model.transformer import Transformer
from moefold.run_dir import newest_run


class KVCache:
    """Keys and values of the tokens seen so far, so each new token runs the model on itself
    alone. Installed through each block's `attn.attention_fn` (the hook context parallelism
    uses), so the model code is unchanged; `forward` feeds the next positions.

    Shapes: q [B, H, S, Dh] for the S new tokens, cached k / v [B, G, T, Dh] for all T so far.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.length = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> KVCache:
        for name, block in self.model.layers.items():
            self._saved[name] = block.attn.attention_fn
            block.attn.attention_fn = functools.partial(self._attend, name)
        return self

    def __exit__(self, *exc) -> None:
        for name, block in self.model.layers.items():
            block.attn.attention_fn = self._saved[name]

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.length = 0

    def _attend(self, name, q_BHSDh, k_BGSDh, v_BGSDh, positions_S, bf16_gemm="auto"):
        if name in self.keys:
            k_BGSDh = torch.cat([self.keys[name], k_BGSDh], dim=2)
            v_BGSDh = torch.cat([self.values[name], v_BGSDh], dim=2)
        self.keys[name], self.values[name] = k_BGSDh, v_BGSDh
        new, total = q_BHSDh.shape[2], k_BGSDh.shape[2]
        # new token i sits at position total - new + i and sees keys 0..that position
        mask_ST = torch.arange(total)[None, :] <= torch.arange(total - new, total)[:, None]
        return F.scaled_dot_product_attention(
            q_BHSDh, k_BGSDh, v_BGSDh, attn_mask=mask_ST.to(q_BHSDh.device), enable_gqa=True
        )

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] of the new tokens, which follow the cached ones."""
        positions_S = torch.arange(self.length, self.length + tokens_BS.shape[1])
        logits = self.model(tokens_BS, positions_S)
        self.length += tokens_BS.shape[1]
        return logits


def _next_token(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator
) -> int:
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        threshold = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def sample(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    generator: torch.Generator,
    max_context: int,
    kv_cache: bool = True,
) -> list[int]:
    """Autoregressive sampling. With `kv_cache` each step runs only the newest token while the
    sequence fits in `max_context`; past it (and without the cache) each step runs the last
    `max_context` tokens afresh at positions 0.., so both ways give the same tokens."""
    ids = list(prompt_ids)
    if not kv_cache:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids[-max_context:]]))[0, -1]
            ids.append(_next_token(logits, temperature, top_k, generator))
        return ids
    with KVCache(model) as cache:
        pending = ids
        for _ in range(max_new_tokens):
            if len(ids) > max_context:  # the window slides: positions restart, no reuse
                cache.reset()
                pending = ids[-max_context:]
            logits = cache.forward(torch.tensor([pending]))[0, -1]
            ids.append(_next_token(logits, temperature, top_k, generator))
            pending = ids[-1:]
    return ids


def generate_from_checkpoint(args: argparse.Namespace) -> str:
    path = resolve_checkpoint(newest_run(Path(args.checkpoint)), "--checkpoint")
    job = load_job(str(path / CONFIG_FILE))
    model = Transformer(job.model, job.moe)
    load_checkpoint(path, model, None)
    model.eval()
    tokenizer = checkpoint_tokenizer(path, job)
    if tokenizer is None:
        raise ConfigError(f"data.source={job.data.source} has no tokenizer to decode text")
    generator = torch.Generator().manual_seed(args.seed)
    prompt = tokenizer.encode(args.prompt)
    ids = sample(
        model,
        prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        generator,
        job.train.seq_len,
        kv_cache=getattr(args, "kv_cache", True),
    )
    return tokenizer.decode(ids)


def checkpoint_tokenizer(path: Path, job) -> TextTokenizer | None:
    """The tokenizer a checkpoint's text is in: the model's own (CKPT/tokenizer/, kept by
    `convert --from-hf`, or data.tokenizer), else the BPE its text source trains."""
    if (path / "tokenizer" / "tokenizer.json").is_file():
        return load_pretrained_tokenizer(path / "tokenizer")
    return load_tokenizer(job.data, job.model.vocab_size)
