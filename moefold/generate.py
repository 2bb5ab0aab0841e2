"""`moefold generate`: sample text from a checkpoint so a user can read what the model learned."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moefold.checkpoint import CONFIG_FILE, load_checkpoint, resolve_checkpoint
from moefold.config import ConfigError, load_job
from moefold.data import load_tokenizer
from moefold.model.transformer import Transformer


@torch.no_grad()
def sample(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    generator: torch.Generator,
    max_context: int,
) -> list[int]:
    """Autoregressive sampling (full recompute per token: fine for debug-size models)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_context:]])
        logits = model(context)[0, -1].float()
        if temperature <= 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k > 0:
            threshold = logits.topk(min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return ids


def generate_from_checkpoint(args: argparse.Namespace) -> str:
    path = resolve_checkpoint(Path(args.checkpoint), "--checkpoint")
    job = load_job(str(path / CONFIG_FILE))
    model = Transformer(job.model, job.moe)
    load_checkpoint(path, model, None)
    model.eval()
    tokenizer = load_tokenizer(job.data, job.model.vocab_size)
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
    )
    return tokenizer.decode(ids)
