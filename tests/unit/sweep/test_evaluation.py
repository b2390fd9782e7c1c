"""Evaluation pieces on a tiny real model: held-out loss, expert counts, report and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from components.config import load_config
from components.evaluation.metrics import ModelEvaluation, held_out_loss, perplexity
from components.evaluation.plots import plot_expert_utilisation
from components.evaluation.report import report_json, report_markdown
from components.model.transformer import Transformer, dense_equivalent


@pytest.fixture(scope="module")
def tiny_model():
    config = load_config(["experiment=tiny"])
    torch.manual_seed(0)
    return Transformer(config.model, 300).eval(), config


def test_held_out_loss_matches_cross_entropy_and_counts_experts(tiny_model):
    model, config = tiny_model
    batches = [torch.randint(0, 300, (2, 17)) for _ in range(3)]
    loss, tokens, counts = held_out_loss(model, batches)
    with torch.no_grad():
        expected = torch.stack(
            [
                F.cross_entropy(
                    model(b[:, :-1])[0].reshape(-1, 300), b[:, 1:].reshape(-1), reduction="sum"
                )
                for b in batches
            ]
        ).sum() / (3 * 2 * 16)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert tokens == 3 * 2 * 16
    assert len(counts) == config.model.n_layers and all(
        len(c) == config.model.num_experts for c in counts
    )
    # every token is routed to top_k experts (before capacity drops)
    assert all(sum(c) == tokens * config.model.top_k for c in counts)
    assert perplexity(loss) == pytest.approx(math.exp(loss))
    with pytest.raises(ValueError, match="no held-out batches"):
        held_out_loss(model, [])


def test_dense_equivalent_has_equal_active_params(tiny_model):
    model, config = tiny_model
    dense = Transformer(dense_equivalent(config.model), 300)
    # equal active FFN width: the MoE's active parameters exceed the dense model's by exactly its
    # routers (a [num_experts, dim] gate per MoE layer), whatever the expert count
    routers = sum(layer.router.gate.weight.numel() for layer in model.moe_layers())
    assert routers > 0
    assert model.num_params(active=True) == dense.num_params() + routers


def test_report_side_by_side(tmp_path):
    def ev(label, loss, counts=()):
        return ModelEvaluation(
            label=label,
            source=f"runs:/{label}",
            kind="dense" if label == "dense_baseline" else "moe",
            val_loss=loss,
            perplexity=math.exp(loss),
            tokens_evaluated=100,
            params_total=10,
            params_active=5,
            generation_tokens_per_s=42.0,
            expert_counts=list(counts),
            samples={"def ": "main():"},
        )

    evaluations = [ev("moe", 2.0, [[5, 3], [4, 4]]), ev("dense_baseline", 2.5), ev("champion", 2.2)]
    md = report_markdown(evaluations, {"dataset_digest": "abc"})
    assert "| metric | moe | dense_baseline | champion |" in md
    assert "| held-out loss | 2.0000 | 2.5000 | 2.2000 |" in md and "expert_utilisation.png" in md
    data = json.loads(report_json(evaluations, {"dataset_digest": "abc"}))
    assert set(data["models"]) == {"moe", "dense_baseline", "champion"}
    assert data["models"]["champion"]["val_loss"] == 2.2
    png = plot_expert_utilisation([[5, 3], [4, 4]], tmp_path / "u.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no MoE layers"):
        plot_expert_utilisation([], tmp_path / "none.png")
