"""Checkpoints through torch.distributed.checkpoint (DCP), written atomically.

Layout of one checkpoint folder `CKPT_ROOT/step_00000040/`:
    .metadata, *.distcp   model and optimizer state (DCP, keyed by stable parameter names)
    trainer.json          step, data-loader position and other plain trainer state
    config.toml           the resolved JobConfig
Every rank writes into `CKPT_ROOT/.tmp-step_00000040/`; after all ranks finish, the coordinator
renames it into place, so a folder named `step_*` is always complete. A crash while saving
leaves only a `.tmp-*` folder that the next save removes. Only the newest `keep` checkpoints
are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

logger = logging.getLogger(__name__)

TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.toml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _is_intact(path: Path) -> bool:
    try:
        json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (path / ".metadata").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def find_resume_checkpoint(root: Path, resume: str) -> Path | None:
    """'none' -> None; a path -> that checkpoint (must be intact); 'auto' -> the newest intact
    checkpoint under root, skipping (and logging) broken ones."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not _is_intact(path):
            raise CheckpointError(
                f"checkpoint.resume: {path} is not an intact checkpoint (needs {TRAINER_FILE} "
                "and .metadata); pass another folder or checkpoint.resume=auto"
            )
        return path
    for path in reversed(list_checkpoints(root)):
        if _is_intact(path):
            return path
        logger.warning("skipping broken checkpoint %s", path)
    return None


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config_toml: str,
    keep: int,
    is_coordinator: bool,
    barrier: Callable[[], None],
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if is_coordinator:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    barrier()
    if is_coordinator:
        (tmp / CONFIG_FILE).write_text(config_toml)
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Load model (and optimizer) state in place; returns the trainer state."""
    try:
        trainer_state = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({error})") from error
    if optimizer is None:
        model_state = get_state_dict(model, [])[0]
        state: dict[str, Any] = {"model": model_state}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # DCP raises many types for truncated/corrupt files
        raise CheckpointError(f"{path}: could not be read ({type(error).__name__}: {error})") from error
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={},
                       options=StateDictOptions(strict=True))
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    return trainer_state
