"""`moefold report`: the page, its charts and flags from hand-made metrics, and (when Chromium
is installed) the page as a real headless browser renders it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402  (pillow comes with matplotlib)

from moefold.cli import main  # noqa: E402
from moefold.report.page import build_report  # noqa: E402


def _write_run(folder: Path, loss0: float, dead: int | None, steps: int = 12) -> Path:
    """A run folder with `steps` metrics rows: 2 MoE layers x 8 experts; in layer 1 expert
    `dead` gets no tokens and expert 0 gets 3x the others (overloaded)."""
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        skewed = [300] + [100] * 7
        if dead is not None:
            skewed[dead] = 0
        rows.append(
            {
                "step": step,
                "loss": loss0 - 0.1 * step,
                "lr": 1e-3 * min(1.0, step / 4),
                "tokens_per_s": 1000.0 + step,
                "mfu": 0.01,
                "expert_load": {"0": [100] * 8, "1": skewed},
                "dropped_frac": {"0": 0.0, "1": 0.02 * step / steps},
                "comm_bytes": {"tp": 0, "ep": 4096 * step, "dp": 2**20},
                **({"val_loss": loss0 - 0.1 * step + 0.05} if step % 4 == 0 else {}),
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _colours(png: bytes) -> int:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 20) or [])


def test_report_has_every_chart_and_flags_dead_and_overloaded_experts(tmp_path):
    a = _write_run(tmp_path / "runs" / "a", 5.0, dead=3)
    b = _write_run(tmp_path / "runs" / "b", 4.0, dead=None)
    page = build_report([a, b], tmp_path / "out" / "report.html")
    text = page.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    # loss, throughput, dropped, comm, and one expert-load heat map per run
    assert len(images) == 6
    for data in images:
        assert _colours(base64.b64decode(data)) > 20  # drawn charts, not a blank canvas
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(
        f"report-{n}.png"
        for n in ("loss", "throughput", "dropped", "comm", "expert-load-0", "expert-load-1")
    )
    flags = re.findall(
        r"<td>(\w+)</td><td>(\d+)</td><td[^>]*>[^<]*</td><td class='(?:flag|ok)'>([^<]*)<", text
    )
    assert ("a", "1", "dead [3]; overloaded [0]") in flags
    assert ("b", "1", "overloaded [0]") in flags
    assert ("a", "0", "ok") in flags
    assert "2 layer(s) flagged" in text
    assert "<script" not in text and "http" not in text  # self-contained, nothing to fetch


def test_report_command_writes_one_run_page_into_the_run(tmp_path, capsys):
    run = _write_run(tmp_path / "r", 3.0, dead=None)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert "report written to" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(tmp_path: Path, url: str, *flags: str) -> subprocess.CompletedProcess:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *flags,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="chromium missing (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    a = _write_run(tmp_path / "runs" / "a", 5.0, dead=3)
    b = _write_run(tmp_path / "runs" / "b", 4.0, dead=None)
    page = build_report([a, b], tmp_path / "report.html")
    # The detector works: a page with a script error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert _console_lines(_browser(tmp_path, bad.as_uri(), "--dump-dom").stderr)

    dom = _browser(tmp_path, page.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_lines(dom.stderr) == []
    assert "<h1>moefold report</h1>" in dom.stdout
    assert dom.stdout.count("<img") == 6

    shot = tmp_path / "shot.png"
    result = _browser(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,2400")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_lines(result.stderr) == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    assert _colours(shot.read_bytes()) > 100  # text and charts, not a blank or error page
    # The loss chart sits in the first screen: its area holds the plot lines' colour (C0 blue).
    top = image.crop((0, 0, 1200, 700))
    blues = sum(
        count for count, (r, g, bl) in top.getcolors(1 << 20) if bl > 150 and r < 80 and g < 150
    )
    assert blues > 200


def test_a_folder_of_runs_stands_for_every_run_in_it(tmp_path):
    for stamp in ("20261207-010000", "20261207-020000"):
        _write_run(tmp_path / "runs" / "tiny-moe" / stamp, 3.0, dead=None)
    single = _write_run(tmp_path / "runs" / "top1", 4.0, dead=1)
    out = tmp_path / "cmp.html"
    assert (
        main(["report", str(single), str(tmp_path / "runs" / "tiny-moe"), "--out", str(out)]) == 0
    )
    text = out.read_text()
    assert text.count("<h2>Expert load: ") == 3
    assert "tiny-moe/20261207-010000" in text and "tiny-moe/20261207-020000" in text
