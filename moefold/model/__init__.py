"""The single-device model: transformer blocks with dense or MoE MLPs."""

import torch

from moefold.config import JobConfig
from moefold.model.init import init_parameters, materialize
from moefold.model.moe import MoELayer
from moefold.model.transformer import Transformer


def build_model(job: JobConfig, device: torch.device | str | None = None) -> Transformer:
    """The full model with deterministic, layout-invariant initial weights.

    device="meta": a skeleton with no storage and no values. Parallel code shards it
    (moefold/parallel/apply.py) and then fills only its own shards with
    `materialize(model, job.model, job.train.seed, device, shard_index)`, so no rank ever holds
    the full model (moefold/train/launch.py)."""
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return Transformer(job.model, job.moe)
    model = Transformer(job.model, job.moe)
    init_parameters(model, job.model, job.train.seed)
    return model if device is None else model.to(device)


__all__ = ["MoELayer", "Transformer", "build_model", "init_parameters", "materialize"]
