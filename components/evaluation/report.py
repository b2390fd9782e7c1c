"""The evaluation report: MoE, dense baseline and champion side by side (Markdown + JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from components.evaluation.metrics import ModelEvaluation

ROWS = (
    ("val_loss", "held-out loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("generation_tokens_per_s", "generation tokens/s", "{:.1f}"),
    ("params_total", "parameters (total)", "{:,.0f}"),
    ("params_active", "parameters (active per token)", "{:,.0f}"),
)


def _fmt(template: str, value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else template.format(value)
    )


def report_dict(evaluations: Sequence[ModelEvaluation], context: dict[str, Any]) -> dict[str, Any]:
    """JSON form: ``models`` keyed by label (moe / dense_baseline / champion) plus the context."""
    return {"context": context, "models": {e.label: e.to_dict() for e in evaluations}}


def report_markdown(evaluations: Sequence[ModelEvaluation], context: dict[str, Any]) -> str:
    labels = [e.label for e in evaluations]
    lines = ["# Evaluation report", ""]
    lines += [f"- **{k}**: {v}" for k, v in context.items()]
    lines += [
        "",
        "## Held-out metrics",
        "",
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for key, name, template in ROWS:
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(template, e.headline()[key]) for e in evaluations)
            + " |"
        )
    lines.append("| source | " + " | ".join(f"`{e.source}`" for e in evaluations) + " |")
    moe = next((e for e in evaluations if e.expert_counts), None)
    if moe is not None:
        lines += [
            "",
            f"## Expert utilisation ({moe.label})",
            "",
            "![expert utilisation](expert_utilisation.png)",
            "",
            "| layer | tokens per expert | max/mean load |",
            "|---|---|---|",
        ]
        for i, counts in enumerate(moe.expert_counts):
            mean = sum(counts) / max(len(counts), 1)
            lines.append(f"| {i} | {counts} | {max(counts) / mean if mean else float('nan'):.2f} |")
    lines += ["", "## Sample completions (greedy)", ""]
    for e in evaluations:
        lines += [f"### {e.label}", ""]
        for prompt, completion in e.samples.items():
            lines += ["```text", f"{prompt}\u2502{completion}", "```"]
        lines.append("")
    return "\n".join(lines)


def report_json(evaluations: Sequence[ModelEvaluation], context: dict[str, Any]) -> str:
    return json.dumps(report_dict(evaluations, context), indent=2, sort_keys=True, default=str)
