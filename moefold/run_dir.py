"""Run folders: a fresh `runs/<config>/<timestamp>` per `moefold train` unless `--out` names one.

Also answers "where is the newest run under runs/<config>" (generate, convert) and "has this
run already trained what it was asked for" (so a finished run is never re-entered silently).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from moefold.checkpoint import find_resume_checkpoint
from moefold.config import ConfigError

RUNS_ROOT = Path("runs")
_STORE_KEY = "moefold/run_dir"


def config_name(config: str) -> str:
    """A preset's name, a TOML file's stem, or for CKPT/config.toml the checkpoint's folder."""
    path = Path(config)
    if path.name == "config.toml" and path.parent.name not in ("", "."):
        return path.parent.name
    return path.stem


def new_run_dir(config: str, root: Path = RUNS_ROOT) -> Path:
    """Create and return `root/<config name>/<UTC timestamp>` (suffixed -2, -3... on a clash)."""
    parent = root / config_name(config)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for attempt in range(1, 1000):
        path = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {parent}")


def torchrun_run_dir(
    config: str, agent_store: tuple[str, int] | None, rank: int, root: Path = RUNS_ROOT
) -> Path:
    """Under torchrun without --out: rank 0 creates the folder and every rank reads its name
    from torchrun's own rendezvous store at `agent_store` (host, port; cli.py reads it from the
    launcher's environment), so restarts within one torchrun reuse the folder and resume. The
    store is torchrun's agent store: no process group exists yet."""
    import torch.distributed as dist

    if agent_store is None:
        raise ConfigError(
            "--out: required when ranks are not launched by torchrun (no shared store to agree "
            "on a run folder); pass --out runs/NAME"
        )
    store = dist.TCPStore(*agent_store, is_master=False, timeout=timedelta(minutes=5))
    if rank == 0 and not store.check([_STORE_KEY]):
        store.set(_STORE_KEY, str(new_run_dir(config, root)))
    return Path(store.get(_STORE_KEY).decode())


def checkpoint_root(out_dir: Path, checkpoint_dir: str) -> Path:
    """Where a run's checkpoints live (checkpoint.dir, or OUT/checkpoints)."""
    return Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"


def finished_step(root: Path) -> int | None:
    """The step of the newest intact checkpoint under `root`, or None when there is none."""
    path = find_resume_checkpoint(root, "auto")
    return None if path is None else int(path.name.split("_")[-1])


def newest_run(path: Path) -> Path:
    """`path` itself when it is a run or checkpoint folder; for a folder of runs (such as
    runs/tiny-moe) the newest run in it that has checkpoints."""
    if (path / "checkpoints").is_dir() or (path / ".metadata").is_file():
        return path
    if any(path.glob("step_*")):
        return path
    runs = (
        sorted((p for p in path.iterdir() if (p / "checkpoints").is_dir()), key=lambda p: p.name)
        if path.is_dir()
        else []
    )
    return runs[-1] if runs else path
