"""The single-device model: transformer blocks with dense or MoE MLPs."""

from moefold.config import JobConfig
from moefold.model.init import init_parameters
from moefold.model.moe import MoELayer
from moefold.model.transformer import Transformer


def build_model(job: JobConfig) -> Transformer:
    """The full model with deterministic, layout-invariant initial weights."""
    model = Transformer(job.model, job.moe)
    init_parameters(model, job.model, job.train.seed)
    return model


__all__ = ["MoELayer", "Transformer", "build_model", "init_parameters"]
