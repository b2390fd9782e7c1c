"""Issue 16: the routed output's scale against the dense equivalent's, and the factor that fixes
it (``model.routed_scaling_factor``, DeepSeek-V3)."""

import dataclasses

import pytest
import torch

from components.config import load_config
from components.config.schema import ModelConfig
from components.model import Transformer, dense_equivalent
from components.model.moe import MoELayer
from fixtures.moe_reference import reference_moe_forward as naive_moe


def _ffn_rms(cfg: ModelConfig, x: torch.Tensor) -> float:
    """RMS of the first block's FFN output at init (the model's own init_weights)."""
    torch.manual_seed(0)
    block = Transformer(cfg, vocab_size=64).eval().layers[0]
    with torch.no_grad():
        out = block.moe(x)[0] if block.moe is not None else block.feed_forward(x)
    return float(out.pow(2).mean().sqrt())


def test_renormalised_top_k_shrinks_the_routed_output_by_about_k():
    """The defect: k renormalised weights average k experts, the dense equivalent sums k x ffn
    hidden units, so without a factor the MoE's FFN starts about 1/k as large (and a factor of
    k restores it)."""
    x = torch.randn(2048, 64)
    for k, experts in ((2, 8), (4, 16)):
        cfg = ModelConfig(
            dim=64, n_heads=4, ffn_dim=64, num_experts=experts, top_k=k, dropless=True
        )
        dense = _ffn_rms(dense_equivalent(cfg), x)
        plain = _ffn_rms(cfg, x)
        scaled = _ffn_rms(dataclasses.replace(cfg, routed_scaling_factor=float(k)), x)
        assert plain / dense == pytest.approx(1 / k, rel=0.25), k
        assert scaled / dense == pytest.approx(1.0, rel=0.25), k


def test_the_recipe_starts_at_its_dense_equivalents_output_scale(tmp_path):
    """What would have caught it: moe_tiny's MoE FFN output at init within 25% of its dense
    equivalent's (it was half before model.routed_scaling_factor)."""
    cfg = load_config([f"paths.root={tmp_path}"]).model
    x = torch.randn(4096, cfg.dim)
    ratio = _ffn_rms(cfg, x) / _ffn_rms(dense_equivalent(cfg), x)
    assert ratio == pytest.approx(1.0, rel=0.25)


def test_the_factor_scales_the_gate_weights_and_output_exactly():
    torch.manual_seed(0)
    base = ModelConfig(dim=16, ffn_dim=32, num_experts=4, top_k=2, dropless=True)
    layer = MoELayer(base).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    scaled = MoELayer(dataclasses.replace(base, routed_scaling_factor=2.5)).train()
    scaled.load_state_dict(layer.state_dict())
    x = torch.randn(37, 16)
    torch.testing.assert_close(scaled(x)[0], 2.5 * layer(x)[0])
    torch.testing.assert_close(scaled.router(x).weights.sum(-1), torch.full((37,), 2.5))
    torch.testing.assert_close(scaled(x)[0], naive_moe(scaled, x), atol=1e-5, rtol=1e-5)


def test_the_factor_must_be_positive(tmp_path):
    from components.config.validate import ConfigError

    with pytest.raises(ConfigError, match="model.routed_scaling_factor=0.0: must be > 0"):
        load_config([f"paths.root={tmp_path}", "model.routed_scaling_factor=0"])
