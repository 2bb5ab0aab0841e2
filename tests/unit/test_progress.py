"""Console progress: plain lines every train.log_every steps when stdout is not a terminal,
the end-of-run summary, and the expert-load flags."""

import logging
from pathlib import Path

from moefold.train.progress import Progress, expert_load_flags, summarize


def _row(step, loss=3.0, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 500.0, "mfu": 0.02, **extra}


def test_plain_lines_every_log_every_steps_and_at_the_end(capsys):
    progress = Progress(True, total=7, initial=0, log_every=3, terminal=False)
    for step in range(1, 8):
        progress.update(_row(step, **({"val_loss": 2.5} if step == 4 else {})))
    progress.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    # steps 3 and 6 (log_every), 4 (an evaluation) and 7 (the last)
    assert [line.split(" |")[0] for line in lines] == [
        "step 3/7",
        "step 4/7",
        "step 6/7",
        "step 7/7",
    ]
    assert "val 2.5000" in lines[1] and "mfu 2.0%" in lines[0]


def test_lines_go_through_logging_when_a_handler_takes_info(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="moefold.train.progress"):
        progress = Progress(True, total=2, initial=0, log_every=1, terminal=False)
        progress.update(_row(1))
    assert "step 1/2" in caplog.text
    assert capsys.readouterr().out == ""


def test_other_ranks_print_nothing(capsys):
    progress = Progress(False, total=2, initial=0, log_every=1, terminal=False)
    progress.update(_row(1))
    assert capsys.readouterr().out == ""


def test_expert_flags_use_the_documented_thresholds():
    counts = [0, 9, 100, 100, 100, 100, 100, 291]  # mean 100
    assert expert_load_flags(counts) == {"dead": [0, 1], "overloaded": [7]}  # 9 < 10, 291 > 200
    assert expert_load_flags([100] * 8) == {"dead": [], "overloaded": []}


def test_summary_names_losses_files_and_flagged_experts():
    rows = [
        _row(s, loss=4.0 - s / 10, expert_load={"0": [40, 0, 20, 20]}, dropped_frac={"0": 0.0})
        for s in range(1, 9)
    ]
    rows[-1]["val_loss"] = 3.5
    lines = summarize(rows, Path("runs/x"), Path("runs/x/checkpoints/step_00000008"))
    text = "\n".join(lines)
    assert "done at step 8: loss 3.2000, val loss 3.5000" in text
    assert "layer   0: 2.00 0.00 1.00 1.00  <- DEAD [1]" in text
    assert "runs/x/metrics.jsonl" in text and "step_00000008" in text


def test_terminal_gets_a_tqdm_bar_not_lines(capsys):
    progress = Progress(True, total=3, initial=0, log_every=2, terminal=True)
    for step in (1, 2, 3):
        progress.update(_row(step))
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == ""  # no plain lines
    assert "3/3" in captured.err and "\r" in captured.err  # tqdm's frames, on stderr
