"""The report page: charts as PNGs (embedded as base64, and written beside the page), a summary
table per run and a table of dead / overloaded experts. Static HTML: no scripts, no network."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from moefold.report import charts
from moefold.report.runs import Run, expand_run_dirs, load_run
from moefold.train.progress import DEAD_SHARE, OVERLOAD_SHARE, expert_load_flags, summed_load

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.flag { color: #b00020; text-align: left; }
td.ok { color: #2e7d32; text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; }
"""


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _last(run: Run, key: str):
    values = run.series(key)[1]
    return values[-1] if values else None


def _mean(run: Run, key: str):
    values = run.series(key)[1]
    return sum(values) / len(values) if values else None


def summary_table(runs: list[Run]) -> str:
    head = (
        "<tr><th>run</th><th>steps</th><th>final loss</th><th>final val loss</th>"
        "<th>tokens/s (mean)</th><th>MFU (mean)</th><th>max dropped</th></tr>"
    )
    body = []
    for run in runs:
        dropped = [max(r["dropped_frac"].values()) for r in run.rows if r.get("dropped_frac")]
        mfu = _mean(run, "mfu")
        body.append(
            f"<tr><td>{html.escape(run.label)}</td><td>{len(run.rows)}</td>"
            f"<td>{_fmt(_last(run, 'loss'))}</td><td>{_fmt(_last(run, 'val_loss'))}</td>"
            f"<td>{_fmt(_mean(run, 'tokens_per_s'), '.0f')}</td>"
            f"<td>{_fmt(None if mfu is None else mfu * 100, '.2f')}%</td>"
            f"<td>{_fmt(max(dropped) * 100 if dropped else None, '.2f')}%</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def flags_table(runs: list[Run]) -> tuple[str, int]:
    """Dead / overloaded experts per run and layer over the last quarter of each run."""
    body, flagged = [], 0
    for run in runs:
        window = max(1, len(run.rows) // 4)
        for layer, counts in summed_load(run.rows, window).items():
            flags = expert_load_flags(counts)
            uniform = sum(counts) / max(len(counts), 1) or 1.0
            if flags["dead"] or flags["overloaded"]:
                flagged += 1
            shares = " ".join(f"{c / uniform:.2f}" for c in counts)
            marks = "; ".join(
                f"{kind} {flags[kind]}" for kind in ("dead", "overloaded") if flags[kind]
            )
            body.append(
                f"<tr><td>{html.escape(run.label)}</td><td>{layer}</td>"
                f"<td style='text-align:left'>{shares}</td>"
                f"<td class='{'flag' if marks else 'ok'}'>{marks or 'ok'}</td>"
                "</tr>"
            )
    head = "<tr><th>run</th><th>layer</th><th>share per expert (x uniform)</th><th>flags</th></tr>"
    return f"<table>{head}{''.join(body)}</table>", flagged


def build_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the report page `out` (and its PNGs beside it as <out stem>-<chart>.png); a
    folder of runs (runs/tiny-moe) stands for every run in it."""
    runs = [load_run(p) for p in expand_run_dirs(run_dirs)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = [
        ("loss", "Loss, validation loss and learning rate", charts.loss_chart(runs)),
        ("throughput", "Throughput and MFU", charts.throughput_chart(runs)),
        ("dropped", "Dropped tokens", charts.dropped_chart(runs)),
        ("comm", "Bytes per communication family", charts.comm_chart(runs)),
    ]
    for i, run in enumerate(runs):
        title = f"Expert load: {run.label}"
        figures.append((f"expert-load-{i}", title, charts.expert_load_heatmap(run)))
    sections = []
    for name, title, figure in figures:
        if figure is None:
            sections.append(f"<h2>{html.escape(title)}</h2><p class='note'>no data</p>")
            continue
        png = charts.to_png(figure)
        (out.parent / f"{out.stem}-{name}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        sections.append(
            f"<h2>{html.escape(title)}</h2>"
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    table, flagged = flags_table(runs)
    names = ", ".join(html.escape(str(run.path)) for run in runs)
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>moefold report</title><style>{_STYLE}</style></head><body>"
        f"<h1>moefold report</h1><p class='note'>runs: {names}</p>"
        f"{summary_table(runs)}{''.join(sections[:4])}"
        f"<h2>Expert flags ({flagged} layer(s) flagged)</h2>"
        f"<p class='note'>Over the last quarter of each run's steps. An expert is dead below "
        f"{DEAD_SHARE} x and overloaded above {OVERLOAD_SHARE} x the uniform share (its "
        "layer's routed tokens / number of experts).</p>"
        f"{table}{''.join(sections[4:])}</body></html>\n"
    )
    out.write_text(page)
    return out
