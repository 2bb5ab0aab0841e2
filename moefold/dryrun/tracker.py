"""StepMemory: every storage the tensors of a step create, with when it appears and goes.

Why not torch.distributed._tools.mem_tracker.MemTracker: it refuses a module called twice in
one iteration ("multiple iterative calls"), and a training step with gradient accumulation or
a pipeline schedule calls every block once per micro-batch. This mode records the same thing
it records underneath (each new storage an op returns, freed when its last reference dies)
as a timeline, so the peak of any subset can be read afterwards: the activation peak is the
peak of everything except the gradient and optimizer storages the step leaves behind.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class StepMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._keys: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.sizes: dict[int, int] = {}
        self.ops: dict[int, str] = {}  # the op that created each storage (for `live_at`)
        self.events: list[tuple[int, int]] = []  # (key, +1 allocated / -1 freed)

    def ignore(self, tensors) -> None:
        """Storages that exist before the step (parameters, buffers, optimizer state): a view
        of one (a weight's transpose, one expert's slice of the stacked expert weights) is
        not a new storage. Without this every such view was counted as a step allocation."""
        for tensor in tensors:
            if tensor is not None:
                self._keys[tensor.untyped_storage()] = None

    def key_of(self, tensor: torch.Tensor) -> int | None:
        """The timeline key of a tensor's storage, or None if the step did not create it."""
        return self._keys.get(tensor.untyped_storage())

    def _record(self, tensor: torch.Tensor, op: str = "") -> None:
        storage = tensor.untyped_storage()
        if storage in self._keys:
            return
        key = len(self.sizes)
        self._keys[storage] = key
        self.sizes[key] = storage.nbytes()
        self.ops[key] = op
        self.events.append((key, 1))
        weakref.finalize(storage, self.events.append, (key, -1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._record(value, str(func))
        return out

    def peak(
        self, exclude: set[int] = frozenset(), start: int = 0, until: int | None = None
    ) -> int:
        """Most bytes live at once among the recorded storages not in `exclude`, over events
        [start, until) (default: all), counting what was live at `start` as zero: the peak
        of what that stretch adds."""
        live = best = 0
        for index, (key, sign) in enumerate(self.events[:until]):
            if key in exclude:
                continue
            live += sign * self.sizes[key]
            if index == start - 1:
                live = 0  # the baseline of the stretch
            if index >= start:
                best = max(best, live)
        return best

    def live_at_peak(
        self, exclude: set[int] = frozenset(), until: int | None = None, top: int = 10
    ) -> list[tuple[str, int]]:
        """The `top` largest (op, bytes) storages live at the peak of `peak(exclude, 0,
        until)`: what to look at when the peak is larger than expected."""
        live: dict[int, int] = {}
        total = best = 0
        snapshot: dict[int, int] = {}
        for key, sign in self.events[:until]:
            if key in exclude:
                continue
            if sign > 0:
                live[key] = self.sizes[key]
            else:
                live.pop(key, None)
            total += sign * self.sizes[key]
            if total > best:
                best, snapshot = total, dict(live)
        largest = sorted(snapshot.items(), key=lambda item: -item[1])[:top]
        return [(self.ops[key], size) for key, size in largest]
