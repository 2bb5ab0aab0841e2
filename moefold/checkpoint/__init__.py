"""Checkpoints through torch.distributed.checkpoint (DCP): layout-independent and atomic.

Every tensor is saved under its stable parameter name with its GLOBAL shape: a sharded
parameter (tp, ep, etp cuts recorded by apply_*) is wrapped as a DTensor over the matching
DeviceMesh dims, so DCP stores global offsets and any other layout (different tp, cp, pp, ep,
etp, dp or world size) loads it by resharding. Expert weights keep global expert indices
because the ep cut is a plain Shard(0) of the [E, ...] tensor. Replicated tensors are plain
tensors; DCP writes one copy.

Folder `CKPT_ROOT/step_00000040/`:
    .metadata, *.distcp   model parameters, persistent buffers (expert bias), AdamW state
    trainer.json          step, data-loader position, whether the step was finite
    config.toml           the resolved JobConfig
    checksums.json        size and SHA-256 of every other file (integrity.py)
All ranks write into `CKPT_ROOT/.tmp-step_00000040/`; after a barrier the coordinator adds the
checksums and renames it into place, so a `step_*` folder is always complete. A failed save
(disk full, no permission) removes its `.tmp-*` folder and names the path and the OS cause; a
crash leaves one, removed by the next save. The newest `keep` checkpoints are kept, and never
at the cost of the newest one whose step had a finite loss and gradient norm.

Loading never runs code from the folder (safe_load.py) and verifies the checksums first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Shard

from moefold.checkpoint.integrity import MANIFEST_FILE, verify_checkpoint, write_manifest
from moefold.checkpoint.safe_load import load_arguments, read_metadata
from moefold.errors import (  # re-exported: callers catch them from here
    CheckpointError,
    CheckpointRefused,
)
from moefold.parallel.comm import all_ranks_agree
from moefold.parallel.data_parallel import parameter_shards
from moefold.safe_io import describe_os_error, find_cause, find_os_error

__all__ = [
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "TRAINER_FILE",
    "CheckpointError",
    "CheckpointRefused",
    "load_arguments",
    "load_checkpoint",
    "read_metadata",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]

logger = logging.getLogger(__name__)

TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.toml"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_intact(path: Path) -> bool:
    try:
        json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (path / ".metadata").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
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
        if not is_intact(path):
            raise CheckpointError(
                f"checkpoint.resume: {path} is not an intact checkpoint (needs {TRAINER_FILE} "
                "and .metadata); pass another folder or checkpoint.resume=auto"
            )
        return path
    for path in reversed(list_checkpoints(root)):
        if is_intact(path):
            return path
        logger.warning("skipping broken checkpoint %s", path)
    return None


def resolve_checkpoint(path: Path, flag: str) -> Path:
    """A checkpoint folder as given, or the newest intact one under a run folder (its
    checkpoints/) or a checkpoint root. `flag` names the CLI option in the error."""
    if (path / ".metadata").is_file() and (path / CONFIG_FILE).is_file():
        return path
    found = find_resume_checkpoint(path / "checkpoints", "auto") or find_resume_checkpoint(
        path, "auto"
    )
    if found is None:
        raise CheckpointError(f"{flag}: no intact checkpoint in {path}; pass a step_* folder")
    return found


# ---- layout-independent state dicts --------------------------------------------------------


def _global_view(tensor: torch.Tensor, shards, meshes: dict[Any, Any] | None) -> torch.Tensor:
    """The local shard as a DTensor over the mesh dims it was cut along (or the tensor)."""
    if not shards or meshes is None:
        return tensor
    names = tuple(family for family, _ in shards)
    mesh = meshes[names[0]] if len(names) == 1 else meshes[names]
    placements = [Shard(dim) for _, dim in shards]
    return DTensor.from_local(tensor, mesh, placements, run_check=False)


def mesh_lookup(groups) -> dict | None:
    """Sub-meshes by the shard families apply_* record: ("tp",), ("ep",), ("etp",), ("ep","etp")."""
    if groups is None:
        return None
    return {
        "tp": groups.dense_mesh["tp"],
        "ep": groups.expert_mesh["ep"],
        "etp": groups.expert_mesh["etp"],
        ("ep", "etp"): groups.expert_mesh["ep", "etp"],
    }


def training_state(model: nn.Module, optimizer, groups) -> dict[str, Any]:
    """{"model": {name: tensor}, "optim": {name: {exp_avg, exp_avg_sq, step}}}, sharded tensors
    as DTensors. Model tensors share storage with the live parameters, so dcp.load fills them in
    place; optimizer tensors come from `optimizer.export_state()` (moefold.parallel.optimizer)
    and go back through `import_state` after loading."""
    meshes = mesh_lookup(groups)
    params = dict(model.named_parameters())
    state: dict[str, Any] = {"model": {}}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shards = parameter_shards(params[name]) if name in params else ()
        state["model"][name] = _global_view(tensor.detach(), shards, meshes)
    if optimizer is None:
        return state
    state["optim"] = {}
    for name, entry in optimizer.export_state().items():
        shards = parameter_shards(params[name])
        state["optim"][name] = {
            key: value if key == "step" else _global_view(value, shards, meshes)
            for key, value in entry.items()
        }
    return state


def _local_optimizer_state(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {
            key: value.to_local() if isinstance(value, DTensor) else value
            for key, value in entry.items()
        }
        for name, entry in state["optim"].items()
    }


# ---- save / load ---------------------------------------------------------------------------


def _one_process(groups) -> bool:
    """Whether DCP should skip its collectives (no_dist): with one process they gather nothing.
    On gloo they also cost the rest of the run: gloo's gather copies the plans in its worker
    thread, where the copy starts a second OpenMP team; libgomp, now managing more threads than
    CPUs, stops spinning between parallel regions, so every later op waits on a futex wake-up.
    Measured (tiny-moe, 2 threads, 2-core Xeon): 245 ms a step before the first checkpoint,
    460-540 ms after it, ~2700 voluntary context switches a step against ~40."""
    return groups is None or groups.world_size == 1


@contextlib.contextmanager
def _quiet_single_process_notice():
    """DCP warns on every no_dist call that it assumes one process, which is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        yield


def _all_ok(groups, ok: bool) -> bool:
    """Whether every rank reports success: no rank waits on a failed one."""
    return all_ranks_agree(ok, groups.group("world"))


def _save_failure(tmp: Path, step: int, error: BaseException) -> CheckpointError:
    """One line naming the path and the OS cause (DCP buries ENOSPC under its own errors)."""
    os_error = find_os_error(error)
    if os_error is not None:
        cause = describe_os_error(os_error.filename or tmp, os_error)
    else:
        cause = f"{type(error).__name__}: {error}"
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else None
        if free is not None and free < 2**20:
            cause += f"; {tmp.parent}: {os.strerror(errno.ENOSPC)} ({free} bytes free)"
    return CheckpointError(f"saving step {step} failed: {cause}; the partial {tmp} was removed")


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    config_toml: str,
    keep: int,
    groups,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    Raises CheckpointError on every rank when any part fails (the temporary folder is gone).
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    coordinator = groups.is_logging_rank
    failure: BaseException | None = None
    if coordinator:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as error:
            failure = error
    if _all_ok(groups, failure is None):
        state = training_state(model, optimizer, groups)
        try:
            with _quiet_single_process_notice():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=_one_process(groups))
        # DCP's CheckpointException derives from BaseException
        except (Exception, CheckpointException) as error:
            failure = error
    if _all_ok(groups, failure is None) and coordinator:
        try:
            _finish_save(tmp, final, trainer_state, config_toml)
        except OSError as error:
            failure = error
    if not _all_ok(groups, failure is None):
        if coordinator:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            failure = RuntimeError("another rank failed to write its part (see its error)")
        raise _save_failure(tmp, step, failure) from failure
    if coordinator:
        prune_checkpoints(root, keep)
    groups.barrier()
    return final


def _finish_save(tmp: Path, final: Path, trainer_state: dict[str, Any], config_toml: str):
    (tmp / CONFIG_FILE).write_text(config_toml)
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
    write_manifest(tmp)
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    tmp.rename(final)


def step_was_finite(path: Path) -> bool:
    """trainer.json's `finite` (checkpoints from before the flag count as finite)."""
    try:
        return bool(json.loads((path / TRAINER_FILE).read_text()).get("finite", True))
    except (OSError, ValueError, AttributeError):
        return False


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, sparing the newest finite one."""
    saved = list_checkpoints(root)
    good = [p for p in saved if is_intact(p) and step_was_finite(p)]
    spared = good[-1] if good else None
    for old in saved[:-keep]:
        if old != spared:
            shutil.rmtree(old, ignore_errors=True)


def check_model_config(path: Path, model_section: dict, moe_section: dict) -> None:
    """The checkpoint's model must be this model; the layout may differ."""
    try:
        saved = tomllib.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable ({error})") from error
    differences = []
    for section, current in (("model", model_section), ("moe", moe_section)):
        for key in (
            (
                "num_experts",
                "ffn_hidden",
                "shared_ffn_hidden",
                "shared_gate",
                "first_dense_layers",
                "layer_freq",
                "expert_bias",
            )
            if section == "moe"
            else current
        ):
            old, new = saved.get(section, {}).get(key), current.get(key)
            if old != new:
                differences.append(f"{section}.{key}: checkpoint {old!r}, this run {new!r}")
    if differences:
        raise CheckpointError(
            f"{path}: the checkpoint holds a different model ({'; '.join(differences)}); "
            "resume with the same model config (any parallel layout works)"
        )


def resolve_init_checkpoint(init_from: str, model_section: dict, moe_section: dict) -> Path:
    """The checkpoint named by checkpoint.init_from (a step folder, a checkpoint root or a run
    folder), checked to hold this model. Called before any process group starts."""
    path = Path(init_from)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint.init_from: {path} does not exist; pass a moefold checkpoint folder "
            "(e.g. the --out of `moefold convert --from-hf` or `moefold upcycle --format moefold`)"
        )
    found = resolve_checkpoint(path, "checkpoint.init_from")
    check_model_config(found, model_section, moe_section)
    return found


def load_checkpoint(path: Path, model: nn.Module, optimizer=None, groups=None) -> dict[str, Any]:
    """Load model (and optimizer) state in place, resharding to this layout; returns the
    trainer state. `groups` may be None for a single-process, unsharded model."""
    verify_checkpoint(path)
    read_metadata(path)  # refuses a crafted file here, with its own error (DCP would wrap it)
    try:
        trainer_state = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({error})") from error
    state = training_state(model, optimizer, groups)
    try:
        with _quiet_single_process_notice():
            dcp.load(state, no_dist=_one_process(groups), **load_arguments(path))
    # DCP raises many types for truncated or corrupt files; its CheckpointException derives
    # from BaseException, so it is named here explicitly.
    except (Exception, CheckpointException) as error:
        refused = find_cause(error, CheckpointRefused)
        if refused is not None:
            raise refused from error
        raise CheckpointError(
            f"{path}: could not be read ({type(error).__name__}: {error}); "
            "use an older checkpoint or checkpoint.resume=auto"
        ) from error
    if optimizer is not None:
        optimizer.import_state(_local_optimizer_state(state))
    return trainer_state
