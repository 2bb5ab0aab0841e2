"""The report's charts, drawn with matplotlib (its object API: no pyplot, no global backend).

Each function takes the runs and returns a Figure (or None when no run has the data); several
runs share one chart, one colour per run.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moefold.report.runs import Run
from moefold.train.progress import DEAD_SHARE, OVERLOAD_SHARE

MAX_HEATMAP_LAYERS = 16  # more layers than this: the first 16 are drawn (the table has all)


def to_png(figure: Figure) -> bytes:
    for ax in figure.axes:  # steps are whole numbers
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _colour(index: int) -> str:
    return f"C{index % 10}"


def loss_chart(runs: list[Run]) -> Figure | None:
    """Training loss (solid) and validation loss (dashed markers) per step, and the lr."""
    if not any(run.series("loss")[0] for run in runs):
        return None
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, lr_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for i, run in enumerate(runs):
        steps, values = run.series("loss")
        loss_ax.plot(steps, values, color=_colour(i), label=f"{run.label} loss")
        steps, values = run.series("val_loss")
        if steps:
            loss_ax.plot(
                steps, values, "o--", color=_colour(i), label=f"{run.label} val loss", ms=4
            )
        steps, values = run.series("lr")
        lr_ax.plot(steps, values, color=_colour(i), label=run.label)
    loss_ax.set(title="loss and validation loss", xlabel="step", ylabel="loss")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(alpha=0.3)
    return figure


def throughput_chart(runs: list[Run]) -> Figure | None:
    """Tokens per second and MFU (percent of the devices' peak) per step."""
    if not any(run.series("tokens_per_s")[0] for run in runs):
        return None
    figure = Figure(figsize=(11, 3.5), layout="constrained")
    tps_ax, mfu_ax = figure.subplots(1, 2)
    for i, run in enumerate(runs):
        tps_ax.plot(*run.series("tokens_per_s"), color=_colour(i), label=run.label)
        steps, values = run.series("mfu")
        mfu_ax.plot(steps, [v * 100 for v in values], color=_colour(i), label=run.label)
    tps_ax.set(title="throughput", xlabel="step", ylabel="tokens / s")
    mfu_ax.set(title="MFU", xlabel="step", ylabel="% of peak")
    for ax in (tps_ax, mfu_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def dropped_chart(runs: list[Run]) -> Figure | None:
    """Fraction of routed tokens dropped by capacity, mean and max over the MoE layers."""
    if not any(run.layers() for run in runs):
        return None
    figure = Figure(figsize=(11, 3), layout="constrained")
    ax = figure.subplots()
    for i, run in enumerate(runs):
        steps, means, maxima = [], [], []
        for row in run.rows:
            dropped = list((row.get("dropped_frac") or {}).values())
            if dropped:
                steps.append(row["step"])
                means.append(100 * sum(dropped) / len(dropped))
                maxima.append(100 * max(dropped))
        ax.plot(steps, means, color=_colour(i), label=f"{run.label} mean over layers")
        ax.plot(steps, maxima, ":", color=_colour(i), label=f"{run.label} worst layer")
    ax.set(title="dropped tokens (capacity)", xlabel="step", ylabel="% of routed")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def comm_chart(runs: list[Run]) -> Figure | None:
    """Mean bytes sent per step and rank-0 view, one bar group per communication family."""
    families = []
    for run in runs:
        families += [f for f in run.comm_families() if f not in families]
    if not families:
        return None
    figure = Figure(figsize=(11, 3.5), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        rows = [row.get("comm_bytes") or {} for row in run.rows]
        means = [sum(r.get(f, 0) for r in rows) / max(len(rows), 1) / 2**20 for f in families]
        positions = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(families))]
        ax.bar(positions, means, width=width, color=_colour(i), label=run.label)
    ax.set_xticks(range(len(families)), families)
    ax.set(title="communication per step by family", ylabel="MiB per step (this rank)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return figure


def expert_load_heatmap(run: Run) -> Figure | None:
    """Per MoE layer: each expert's share of the routed tokens per step, as a multiple of the
    uniform share (1.0 = balanced); dead experts are dark, overloaded ones bright."""
    layers = run.layers()[:MAX_HEATMAP_LAYERS]
    if not layers:
        return None
    columns = min(4, len(layers))
    rows_of_plots = -(-len(layers) // columns)
    figure = Figure(figsize=(11, 2.4 * rows_of_plots + 0.6), layout="constrained")
    axes = figure.subplots(rows_of_plots, columns, squeeze=False)
    image = None
    for index, layer in enumerate(layers):
        ax = axes[index // columns][index % columns]
        steps, grid = [], []
        for row in run.rows:
            counts = (row.get("expert_load") or {}).get(layer)
            if counts is None:
                continue
            uniform = sum(counts) / len(counts) or 1.0
            steps.append(row["step"])
            grid.append([c / uniform for c in counts])
        columns_by_expert = [list(col) for col in zip(*grid)]  # [E][steps]
        image = ax.imshow(
            columns_by_expert,
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            vmin=0.0,
            vmax=OVERLOAD_SHARE * 1.5,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(columns_by_expert) - 0.5, -0.5),
        )
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    for index in range(len(layers), rows_of_plots * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.suptitle(
        f"{run.label}: expert load per step, x uniform share "
        f"(dead < {DEAD_SHARE}, overloaded > {OVERLOAD_SHARE})",
        fontsize=10,
    )
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="x uniform")
    return figure
