"""Bias balancing counts each micro-batch once, even when activation checkpointing recomputes the
forward, and moves the bias only from the optimizer's pre-step hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from components.config.schema import ModelConfig
from components.model.transformer import Transformer
from components.training.step import build_balancer

VOCAB = 64
CFG = ModelConfig(
    dim=32,
    n_heads=2,
    n_layers=2,
    ffn_dim=48,
    num_experts=4,
    top_k=2,
    max_seq_len=32,
    dropless=True,
    bias_balancing=True,
    bias_update_rate=0.01,
)


def _step(recompute: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Two micro-batches, then one optimizer step. Returns (pending counts before the step,
    biases after it, router forward calls)."""
    torch.manual_seed(0)
    model = Transformer(CFG, VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = build_balancer(model, optimizer)
    calls = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda *_: calls.append(1))
        if recompute:  # activation checkpointing of every MoE layer, installed by the test
            forward = layer.forward
            layer.forward = lambda x, _f=forward: checkpoint(_f, x, use_reentrant=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = torch.randint(0, VOCAB, (2, 17), generator=gen)
        logits, aux = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        balancer.accumulate(aux["expert_counts"])
        assert all(
            torch.equal(layer.router.expert_bias, torch.zeros(4)) for layer in model.moe_layers()
        )
    pending = balancer.pending.clone()
    optimizer.step()  # the pre-step hook moves the bias
    return pending, [layer.router.expert_bias.clone() for layer in model.moe_layers()], len(calls)


def test_recomputed_forwards_are_not_counted_twice():
    pending, biases, calls = _step(recompute=False)
    pending_rc, biases_rc, calls_rc = _step(recompute=True)
    assert calls_rc == 2 * calls  # the forward really ran again in backward
    assert torch.equal(pending_rc, pending)
    assert (
        pending.sum() == 2 * 2 * 16 * CFG.top_k * CFG.n_layers
    )  # micro-batches x tokens x k x layers
    for b, b_rc in zip(biases, biases_rc):
        assert torch.equal(b, b_rc) and b.abs().max() == CFG.bias_update_rate
