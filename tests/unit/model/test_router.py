"""Router: capacity and dropping, Switch/z losses by hand, fp32 under autocast, bias balancing."""

import math

import pytest
import torch

from components.config.schema import ModelConfig
from components.model.moe import MoELayer
from components.model.router import (
    ExpertBiasBalancer,
    TopKRouter,
    capacity_keep_mask,
    expert_capacity,
)


def test_expert_capacity_formula():
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.0) == 5
    assert expert_capacity(
        num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.25
    ) == math.ceil(6.25)
    assert expert_capacity(num_tokens=1, num_experts=8, top_k=1, capacity_factor=0.5) == 1


def test_capacity_keeps_first_choices_first_then_token_order():
    # 5 tokens, top-2 over 3 experts, capacity 2 per expert (hand-worked below)
    expert_ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0], [0, 1]])
    keep = capacity_keep_mask(expert_ids, num_experts=3, capacity=2)
    # first choices: expert0 <- t0, t1 (kept), t2, t4 (dropped); expert1 <- t3 (kept)
    # second choices: expert1 <- t0 (kept, slot 2), t1, t4 (full); expert2 <- t2 (kept); expert0 <-
    # t3 (full)
    expected = torch.tensor(
        [[True, True], [True, False], [False, True], [True, False], [False, False]]
    )
    assert torch.equal(keep, expected)


def _one_hot_router_layer(dim=4, num_experts=2, top_k=1, capacity_factor=1.0, dropless=False):
    """An MoE layer whose router sends token x to expert argmax(x[:num_experts])."""
    layer = MoELayer(
        ModelConfig(
            dim=dim,
            ffn_dim=8,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            dropless=dropless,
        )
    )
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :num_experts] = 10 * torch.eye(num_experts)
        for p in layer.experts.parameters():
            p.normal_(std=0.5)
    return layer


def test_dropped_tokens_get_zero_moe_output_and_exact_counts():
    layer = _one_hot_router_layer().train()
    # 4 tokens all prefer expert 0; capacity = ceil(1.0 * 4 * 1 / 2) = 2 -> tokens 2 and 3 dropped
    x = torch.tensor(
        [[1.0, 0, 0.3, 0.1], [1.0, 0, -0.2, 0.5], [1.0, 0, 0.7, 0.2], [1.0, 0, 0.1, -0.4]]
    )
    out, stats = layer(x)
    assert stats.counts.tolist() == [4, 0]
    assert stats.kept_counts.tolist() == [2, 0]
    assert stats.dropped_fraction.item() == pytest.approx(0.5)
    assert torch.all(out[2:] == 0), (
        "dropped tokens must contribute nothing (they ride the residual)"
    )
    assert torch.all(out[:2].abs().sum(-1) > 0)
    # eval mode is dropless: every token is processed
    layer.eval()
    out_eval, stats_eval = layer(x)
    assert stats_eval.kept_counts.tolist() == [4, 0]
    assert torch.allclose(out_eval[:2], out[:2])


def test_dropless_mode_keeps_everything_in_training():
    layer = _one_hot_router_layer(dropless=True).train()
    x = torch.tensor([[1.0, 0, 0, 0]] * 6)
    _, stats = layer(x)
    assert stats.kept_counts.tolist() == [6, 0]
    assert stats.dropped_fraction.item() == 0.0


def test_switch_aux_loss_and_z_loss_match_hand_computation():
    router = TopKRouter(2, 2, 1, dropless=True)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    ln3 = math.log(3.0)
    # probs: tokens 0-2 [3/4, 1/4], token 3 [1/4, 3/4]; top-1 -> f = [3/4, 1/4]
    x = torch.tensor([[ln3, 0.0], [ln3, 0.0], [ln3, 0.0], [0.0, ln3]])
    r = router(x)
    # P = [(3*.75 + .25)/4, (3*.25 + .75)/4] = [.625, .375]; aux = E * sum f*P = 2 * (.75*.625 +
    # .25*.375)
    assert r.aux_loss.item() == pytest.approx(1.125, rel=1e-6)
    # logsumexp([ln3, 0]) = ln 4 for every token
    assert r.z_loss.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    assert r.expert_ids.squeeze(-1).tolist() == [0, 0, 0, 1]
    # top-1 keeps the raw probability as gate weight (Switch)
    assert r.weights.squeeze(-1).tolist() == pytest.approx([0.75, 0.75, 0.75, 0.75])


def test_top2_weights_renormalised_and_fp32_under_autocast():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2, dropless=True)
    x = torch.randn(32, 16)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.bfloat16())
    assert r.weights.dtype == torch.float32
    assert torch.allclose(ref.weights.sum(-1), torch.ones(32))
    # same decisions as fp32 up to the bf16 rounding of the *input* only
    assert (r.expert_ids == ref.expert_ids).float().mean() > 0.9


def test_bias_balancing_moves_load_toward_uniform_without_touching_weights():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 1, dropless=True, bias_balancing=True, bias_update_rate=0.01).train()
    with torch.no_grad():
        router.gate.weight.normal_()
        router.gate.weight[0] += 1.5  # expert 0 is strongly preferred
    gate_before = router.gate.weight.detach().clone()
    x = torch.randn(256, 8) + 1.0
    with torch.no_grad():
        router.eval()
        start = router(x).counts.float()
        router.train()
    balancer = ExpertBiasBalancer([router])
    for _ in range(150):
        before = router.expert_bias.clone()
        balancer.accumulate([router(x).counts])
        assert torch.equal(router.expert_bias, before)  # a forward never moves the bias
        balancer.update()  # once per optimizer step (a pre-step hook in training)
    with torch.no_grad():
        router.eval()
        end = router(x).counts.float()

    def imbalance(c):
        return (c.max() / c.mean()).item()

    assert imbalance(start) > 2.0
    assert imbalance(end) < imbalance(start) - 1.0
    assert router.expert_bias[0] < 0  # the overloaded expert was pushed down
    assert torch.equal(router.gate.weight, gate_before)
