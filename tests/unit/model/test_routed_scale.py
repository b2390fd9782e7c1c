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


def test_ffn_out_init_scale_scales_every_down_projection_and_is_validated():
    """``model.ffn_out_init_scale`` multiplies the depth-scaled init of every FFN down projection
    (dense FFN, routed experts, shared expert), leaves the rest of the model alone, carries over to
    the dense equivalent, and must be positive."""
    from components.config.validate import ConfigError

    with pytest.raises(ConfigError, match=r"model.ffn_out_init_scale=0.0: must be > 0"):
        load_config(["model.ffn_out_init_scale=0"])
    cfg = ModelConfig(
        dim=64, n_heads=4, n_layers=2, ffn_dim=64, num_experts=16, top_k=4, shared_expert=True
    )
    out_std = cfg.init_std / 2  # 1 / sqrt(2 x 2 layers)

    def stds(model_cfg: ModelConfig) -> dict[str, float]:
        torch.manual_seed(0)
        block = Transformer(model_cfg, vocab_size=64).layers[0]
        found = {"wo": block.attention.wo.weight.std().item()}
        if block.moe is not None:
            found["expert_w2"] = block.moe.experts.w2.std().item()
            found["shared_w2"] = block.moe.shared_expert.w2.weight.std().item()
            found["expert_w1"] = block.moe.experts.w1.std().item()
        else:
            found["dense_w2"] = block.feed_forward.w2.weight.std().item()
        return found

    for scale in (1.0, 3.0):
        moe = dataclasses.replace(cfg, ffn_out_init_scale=scale)
        dense = dense_equivalent(moe)
        assert dense.ffn_out_init_scale == scale
        got = {**stds(moe), **stds(dense)}
        for name in ("expert_w2", "shared_w2", "dense_w2"):
            assert got[name] == pytest.approx(out_std * scale, rel=0.1), (scale, name)
        assert got["wo"] == pytest.approx(out_std, rel=0.1)
        assert got["expert_w1"] == pytest.approx(cfg.init_std, rel=0.1)
