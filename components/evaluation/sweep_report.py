"""The sweep summary: one row per trial as CSV and Markdown, and metric-vs-parameter plots.

Pure pandas/matplotlib, so it is testable without Ray; the tune stage builds the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from components.evaluation.plots import save_figure

STATUS_COLOURS = {"completed": "tab:green", "stopped_early": "tab:orange", "errored": "tab:red"}


def trials_frame(rows: Sequence[dict[str, Any]], metric: str, mode: str = "min") -> pd.DataFrame:
    """Rows (trial_id, status, run_id, steps, <metric>, param.*) sorted best first; errored last."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    ascending = mode == "min"
    frame["_missing"] = frame[metric].isna() if metric in frame else True
    sort_cols = ["_missing", metric] if metric in frame else ["_missing"]
    frame = frame.sort_values(
        sort_cols, ascending=[True, ascending][: len(sort_cols)], kind="stable"
    )
    return frame.drop(columns="_missing").reset_index(drop=True)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.5g}"
    return str(value)


def to_markdown(frame: pd.DataFrame, title: str = "Sweep trials") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if frame.empty:
        return f"# {title}\n\n(no trials)\n"
    columns = list(frame.columns)
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_metric_vs_params(
    frame: pd.DataFrame,
    metric: str,
    params: Sequence[str],
    log_params: Sequence[str],
    out_path: str | Path,
) -> Path:
    """One panel per searched parameter: the trial's last ``metric`` against its value, coloured by
    status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(params) or ["trial_id"]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], params):
        column = f"param.{param}" if f"param.{param}" in frame else param
        for status, group in frame.groupby("status") if not frame.empty else []:
            values = group[column] if column in group else group.index
            y = group[metric] if metric in group else [float("nan")] * len(group)
            ax.scatter(
                values.astype(str) if values.dtype == object else values,
                y,
                label=status,
                color=STATUS_COLOURS.get(status, "tab:blue"),
                s=40,
            )
        if param in log_params:
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="trial", fontsize=8)
    fig.suptitle(f"{metric} by hyperparameter ({len(frame)} trials)")
    return save_figure(fig, out_path)


def write_sweep_summary(
    rows: Sequence[dict[str, Any]],
    metric: str,
    mode: str,
    params: Sequence[str],
    log_params: Sequence[str],
    out_dir: str | Path,
) -> dict[str, Path]:
    """trials.csv, trials.md and metric_vs_params.png under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(rows, metric, mode)
    csv_path, md_path = out_dir / "trials.csv", out_dir / "trials.md"
    frame.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(frame))
    png = plot_metric_vs_params(frame, metric, params, log_params, out_dir / "metric_vs_params.png")
    return {"csv": csv_path, "markdown": md_path, "plot": png}
