"""Evaluation plots (matplotlib, Agg backend: no display on cluster nodes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_expert_utilisation(
    expert_counts: Sequence[Sequence[int]],
    out_path: str | Path,
    title: str = "Expert utilisation on held-out data",
) -> Path:
    """One panel per MoE layer: each expert's share of routed tokens against the uniform share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not expert_counts:
        raise ValueError(
            "plot_expert_utilisation: no MoE layers reported expert counts (a dense model?)"
        )
    n = len(expert_counts)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 3.2 * n), 3.4), squeeze=False, sharey=True)
    for layer, (ax, counts) in enumerate(zip(axes[0], expert_counts)):
        total = max(sum(counts), 1)
        shares = [c / total for c in counts]
        ax.bar(range(len(counts)), shares, color="tab:blue")
        ax.axhline(1 / len(counts), color="tab:red", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(f"layer {layer} (max/mean {max(shares) * len(counts):.2f})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(counts)))
    axes[0][0].set_ylabel("share of routed tokens")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, out_path)


def save_figure(fig, out_path: str | Path) -> Path:
    """Lay out, write as PNG (parent dirs created) and free the figure: pyplot keeps every open
    one."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
