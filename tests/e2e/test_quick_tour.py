"""The README's quick tour, run as written (in order, in a fresh folder) with fewer steps:
each `train` must train in its own run folder, `generate` must print text and `report` must
write its page. Plus the run-folder rules the tour relies on."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moefold.cli import main
from moefold.config import check_job, load_job

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


def quick_tour_commands() -> list[list[str]]:
    """The commands of the README's `## Quick tour` bash block (continuations joined)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick tour\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no quick tour bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def runnable(command: list[str]) -> list[str]:
    """`moefold ...` / `torchrun ...` as this interpreter runs them; train gets STEPS steps."""
    if command[0] == "moefold":
        command = [sys.executable, "-m", "moefold", *command[1:]]
    elif command[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
    if "train" in command:
        command += ["--set", f"train.steps={STEPS}"]
    return command


def run_folders(root: Path) -> set[Path]:
    return {p.parent for p in root.glob("runs/**/metrics.jsonl")}


@pytest.mark.slow
def test_readme_quick_tour_trains_each_command(tmp_path):
    commands = quick_tour_commands()
    assert [c[0] for c in commands].count("moefold") >= 3
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    timings = []
    for command in commands:
        before = run_folders(tmp_path)
        started = time.perf_counter()
        result = subprocess.run(
            runnable(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
        )
        timings.append((" ".join(command[:4]), time.perf_counter() - started))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        if "train" in command:
            new = run_folders(tmp_path) - before
            assert len(new) == 1, f"{command}: expected one new run folder, got {new}"
            lines = (new.pop() / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == STEPS  # it trained: one row per step, in its own folder
            console = result.stdout + result.stderr  # progress goes through `logging`
            assert f"done at step {STEPS}" in console
            assert f"step {STEPS}/{STEPS} | loss" in console
            assert "\r" not in console  # plain lines, not tqdm frames, in a pipe
        elif "generate" in command:
            assert len(result.stdout.strip()) > len("The state of the Union")
        elif "report" in command:
            out = command[command.index("--out") + 1]
            assert (tmp_path / out).stat().st_size > 10_000
    print("quick tour timings:", ", ".join(f"{name}: {s:.0f} s" for name, s in timings))


def test_finished_run_says_so_and_exits_zero(tmp_path, monkeypatch, capsys):
    """--out on a run whose newest checkpoint has train.steps steps trains nothing, exits 0,
    and leaves its config.toml alone."""
    run = tmp_path / "runs" / "done"
    step = run / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    (step / ".metadata").write_text("")
    (run / "config.toml").write_text("# the original\n")
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--out", str(run), "--set", "train.steps=3", "--nproc", "2"])
    assert code == 0
    assert "already trained 3 steps" in capsys.readouterr().out
    assert (run / "config.toml").read_text() == "# the original\n"
    assert not (tmp_path / "runs" / "tiny-moe").exists()


def test_new_run_folders_are_distinct_and_newest_run_is_found(tmp_path):
    from moefold import run_dir

    first = run_dir.new_run_dir("tiny-moe", tmp_path)
    second = run_dir.new_run_dir("path/to/tiny-moe.toml", tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "tiny-moe"
    for folder in (first, second):
        (folder / "checkpoints").mkdir()
    assert run_dir.newest_run(tmp_path / "tiny-moe") == max(first, second)
    assert run_dir.newest_run(first) == first
    assert run_dir.config_name("smollm2-ckpt/config.toml") == "smollm2-ckpt"


@pytest.mark.parametrize(
    ("world", "overrides", "suggestion"),
    [
        # 8 experts: ep=3 and ep=6 would fail the next check, so only ep=2 is offered
        (6, ["parallel.ep=4", "train.global_batch=12", "train.micro_batch=2"], "use ep=2,"),
        (4, ["parallel.ep=3"], "use ep=2 or ep=4,"),
        # the layout holds, the expert count does not: check_job's own error gets values too
        (6, ["parallel.ep=3", "train.global_batch=12", "train.micro_batch=2"], "use ep=2"),
    ],
    ids=["world6-ep4", "world4-ep3", "world6-ep3-experts"],
)
def test_layout_error_suggests_only_values_that_pass_every_check(
    world, overrides, suggestion, capsys
):
    args = ["train", "--nproc", str(world)] + [x for o in overrides for x in ("--set", o)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert suggestion in error
    offered = re.search(r"; use (.*?)(, or|$)", error.strip()).group(1)
    kept = [o for o in overrides if not o.startswith("parallel.ep=")]
    for value in re.findall(r"ep=(\d+)", offered):
        # the suggestion passes every check
        check_job(load_job("tiny-moe", [*kept, f"parallel.ep={value}"]), world)
