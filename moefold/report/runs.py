"""Reading run folders for the report: metrics rows, the label of each run, per-step series."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Run:
    """One run folder's metrics rows (one per optimizer step, in step order)."""

    path: Path
    label: str
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a top-level number; rows without a finite value are skipped."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values

    def layers(self) -> list[str]:
        """MoE layer names that appear in expert_load, in numeric order."""
        names: set[str] = set()
        for row in self.rows:
            names.update((row.get("expert_load") or {}).keys())
        return sorted(names, key=int)

    def comm_families(self) -> list[str]:
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys((row.get("comm_bytes") or {}).keys()))
        return list(names)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    by_step = {int(row["step"]): row for row in rows if "step" in row}
    return [by_step[step] for step in sorted(by_step)]


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run folders as given; a folder of runs (runs/tiny-moe) stands for every run in it."""
    out = []
    for path in map(Path, paths):
        inner = sorted(p.parent for p in path.glob("*/metrics.jsonl"))
        out += inner if not (path / "metrics.jsonl").is_file() and inner else [path]
    return out


def load_run(path: Path) -> Run:
    """A run folder (holding metrics.jsonl), or the metrics.jsonl file itself."""
    path = Path(path)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (pass a run folder of moefold train)")
    folder = metrics.parent
    label = (
        folder.name
        if folder.parent.name in ("", "runs", ".")
        else (f"{folder.parent.name}/{folder.name}")
    )
    return Run(folder, label, read_rows(metrics))
