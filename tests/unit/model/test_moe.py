"""MoE layer against the naive per-expert loop (reference_moe_forward); transformer structure and
dense baseline."""

import pytest
import torch

from components.config.schema import ModelConfig
from components.model import Transformer, dense_equivalent, is_expert_param, moe_metrics
from components.model.moe import MoELayer
from components.training.parallel import expert_param_names, split_params
from fixtures.moe_reference import reference_moe_forward as naive_moe


def _layer(**kw):
    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(dim=16, ffn_dim=32, num_experts=4, top_k=2, **kw))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


def test_dropless_equals_naive_loop_forward_and_backward():
    layer = _layer(dropless=True, shared_expert=True).train()
    x = torch.randn(37, 16, requires_grad=True)
    out, _ = layer(x)
    ref = naive_moe(layer, x)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.experts.w1, layer.router.gate.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, layer.experts.w1, layer.router.gate.weight], g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_capacity_mode_equals_naive_loop_with_drops():
    layer = _layer(capacity_factor=0.5).train()
    x = torch.randn(40, 16)
    out, stats = layer(x)
    assert stats.dropped_fraction > 0
    assert torch.allclose(out, naive_moe(layer, x), atol=1e-5)


def test_transformer_layers_expert_marking_and_metrics():
    cfg = ModelConfig(
        dim=32, n_heads=2, n_layers=4, ffn_dim=64, num_experts=4, top_k=2, moe_layer_interval=2
    )
    model = Transformer(cfg, vocab_size=50)
    assert [b.moe is not None for b in model.layers] == [False, True, False, True]
    names = expert_param_names(model)
    assert names and all(".moe.experts." in n for n in names)
    dense, experts = split_params(model)
    assert experts and all(is_expert_param(p) for p in experts)
    assert not any(is_expert_param(p) for p in dense)
    moe = model.moe_layers()[0]
    assert (moe.expert_offset, moe.num_local_experts) == (0, 4)
    logits, aux = model(torch.randint(0, 50, (2, 9)))
    assert logits.shape == (2, 9, 50)
    assert len(aux["expert_counts"]) == 2 and aux["expert_counts"][0].sum() == 2 * 9 * 2
    metrics = moe_metrics(aux)
    assert {
        "moe/dropped_fraction",
        "moe/max_over_mean_load",
        "moe/layer0/tokens_expert3",
        "moe/aux_loss",
    } <= set(metrics)


def test_dense_baseline_has_equal_active_parameters():
    moe_cfg = ModelConfig(
        dim=32, n_heads=2, n_layers=2, ffn_dim=64, num_experts=8, top_k=2, shared_expert=True
    )
    moe = Transformer(moe_cfg, vocab_size=50)
    dense = Transformer(dense_equivalent(moe_cfg), vocab_size=50)
    router_params = sum(m.router.gate.weight.numel() for m in moe.moe_layers())
    assert moe.num_params(active=True) - router_params == dense.num_params()
    assert moe.num_params() > dense.num_params()
    _, aux = dense(torch.randint(0, 50, (1, 5)))
    assert aux["aux_loss"].item() == 0 and aux["expert_counts"] == []


@pytest.mark.parametrize(("n_layers", "interval"), [(6, 2), (4, 4)])  # widths that divide evenly
def test_dense_baseline_of_an_interleaved_moe_has_equal_active_parameters(n_layers, interval):
    """With an MoE every ``interval``-th layer the MoE model's other FFNs are ``ffn_dim`` wide;
    a dense baseline with ``top_k x ffn_dim`` on every layer would have more active parameters
    (it did: 4 layers, interval 2, top-2 -> 1.33x the MoE's active FFN parameters)."""
    moe_cfg = ModelConfig(
        dim=32,
        n_heads=2,
        n_layers=n_layers,
        ffn_dim=64,
        num_experts=8,
        top_k=2,
        moe_layer_interval=interval,
    )
    moe = Transformer(moe_cfg, vocab_size=50)
    dense = Transformer(dense_equivalent(moe_cfg), vocab_size=50)
    routers = sum(m.router.gate.weight.numel() for m in moe.moe_layers())
    assert 0 < len(moe.moe_layers()) < moe_cfg.n_layers
    assert moe.num_params(active=True) - routers == dense.num_params()


def test_conf_dense_tiny_matches_moe_tiny_active_params():
    from components.config import load_config

    moe = load_config(["model=moe_tiny"]).model
    dense = load_config(["model=dense_tiny"]).model
    assert (
        dense_equivalent(moe).ffn_dim == dense.ffn_dim
        and dense.dim == moe.dim
        and dense.n_layers == moe.n_layers
    )


def test_kv_cache_forward_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(dim=32, n_heads=2, n_layers=2, ffn_dim=64), vocab_size=50
    ).eval()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache(2)
        first, _ = model(tokens[:, :7], cache=cache)
        steps = [model(tokens[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(7, 12)]
    assert torch.allclose(torch.cat([first, *steps], 1), full, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = Transformer(
        ModelConfig(dim=32, n_heads=2, n_layers=1, ffn_dim=64, max_seq_len=8), vocab_size=50
    )
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    # the typed section only: a plain dict is a caller's bug, not a config to convert
    with pytest.raises(TypeError, match="takes a ModelConfig, not dict"):
        Transformer({"dim": 32}, vocab_size=50)


def test_model_config_rules_name_the_bad_keys():
    import pytest

    from components.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(["model.moe_layer_interval=5", "model.z_loss_coef=-0.1"])
    assert "model.moe_layer_interval=5" in str(err.value) and "model.z_loss_coef=-0.1" in str(
        err.value
    )


def test_bf16_autocast_keeps_router_fp32_and_matches_fp32():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            dim=32, n_heads=2, n_layers=2, ffn_dim=64, num_experts=4, top_k=2, shared_expert=True
        ),
        vocab_size=50,
    ).train()
    tokens = torch.randint(0, 50, (2, 10))
    ref, ref_aux = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(tokens)
    assert aux["aux_loss"].dtype == torch.float32 and aux["z_loss"].dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    (logits.float().logsumexp(-1).mean() + aux["aux_loss"]).backward()
    assert model.moe_layers()[0].router.gate.weight.grad is not None
