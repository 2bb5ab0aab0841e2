"""Write a model-only DCP checkpoint from a (name, tensor) stream, one tensor in memory at a time.

`dcp.save` wants the whole state dict up front. Here it gets placeholders (meta tensors with
the model's names, shapes and dtypes) and a save planner whose `resolve_data`, which DCP's
file writer calls once per tensor when it writes it, pulls that tensor from the stream. The
writer keeps every tensor of a file until the file is closed, so each tensor gets its own file
(`single_file_per_rank=False`); with one writer thread the files are written in plan order (the
state-dict order the placeholders come in) and each tensor is dropped once written. A
conversion of a model of any size holds about its largest tensor (an expert stack), never the
model: `moefold convert --from-hf` and `upcycle` write checkpoints of models larger than host
memory. A stream in another order still works: tensors that arrive early wait in a look-ahead.

Written here because DCP has no streaming save, and its HuggingFace storage reader maps
checkpoint keys one to one, where moefold stacks experts and renames (interop/hf.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

from moefold.safe_io import find_cause

PREFIX = "model."  # the state dict is {"model": {name: tensor}}, flattened by DCP


class StreamError(ValueError):
    """The stream does not match the model it should hold (missing, extra or misshapen)."""


class _StreamingSavePlanner(DefaultSavePlanner):
    def __init__(self, stream: Iterator[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.stream = stream
        self.early: dict[str, torch.Tensor] = {}  # arrived before DCP asked for them
        self.written: set[str] = set()

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        name = write_item.index.fqn.removeprefix(PREFIX)
        while name not in self.early:
            try:
                key, tensor = next(self.stream)
            except StopIteration:
                raise StreamError(f"tensor {name} is missing from the source") from None
            if key in self.early or key in self.written:
                raise StreamError(f"tensor {key} comes twice in the source")
            self.early[key] = tensor
        tensor = self.early.pop(name)
        expected = tuple(write_item.tensor_data.size)
        if tuple(tensor.shape) != expected:
            raise StreamError(f"{name} has shape {tuple(tensor.shape)}, the model's is {expected}")
        self.written.add(name)
        dtype = write_item.tensor_data.properties.dtype
        return tensor.detach().to("cpu", dtype).contiguous()


def save_streamed(
    stream: Iterable[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor], folder: Path
) -> None:
    """Save `stream` (every name of `expected`, meta tensors giving shape and dtype, once, in
    any order) as DCP's {"model": ...} into `folder` (single process). StreamError names a
    missing, extra, repeated or misshapen tensor, and a ValueError the stream raises comes out
    as itself; `folder` is the caller's to clean up then (interop/output_dir.py)."""
    source = iter(stream)
    planner = _StreamingSavePlanner(source)
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=1)
    try:
        dcp.save({"model": expected}, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException as error:  # DCP wraps what the stream raised (its own ValueErrors too)
        cause = find_cause(error, ValueError)
        if cause is not None:
            raise cause from None
        raise
    extra = sorted(planner.early) + [key for key, _ in source]  # draining runs the stream's checks
    if extra:
        raise StreamError(f"tensors with no place in the model: {extra[:5]}")
