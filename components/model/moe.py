"""The MoE feed-forward layer: router -> token dispatch -> grouped experts -> weighted combine."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from components.model.dispatch import TokenDispatcher
from components.model.experts import GroupedExperts
from components.model.layers import FeedForward
from components.model.router import TopKRouter


@dataclass
class MoEStats:
    """What one MoE layer reports per forward (local tokens of this rank)."""

    aux_loss: torch.Tensor     # scalar, unweighted Switch balancing loss
    z_loss: torch.Tensor       # scalar, unweighted router z-loss
    counts: torch.Tensor       # [E] assignments routed to each expert (before capacity)
    kept_counts: torch.Tensor  # [E] assignments each expert processed (after capacity)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        total = self.counts.sum().clamp(min=1)
        return (self.counts.sum() - self.kept_counts.sum()).float() / total

    @property
    def max_over_mean_load(self) -> torch.Tensor:
        counts = self.counts.float()
        return counts.max() / counts.mean().clamp(min=1e-9)


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts, optionally sharded over an expert-parallel group, plus an
    optional always-on shared expert. Dropped assignments contribute zero, so a token dropped by
    every chosen expert passes through the block's residual unchanged."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *,
                 capacity_factor: float = 1.25, dropless: bool = False, shared_expert: bool = False,
                 bias_balancing: bool = False, bias_update_rate: float = 1e-3,
                 ep_group=None, async_a2a: bool = True, a2a_chunks: int = 1):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = TopKRouter(dim, num_experts, top_k, capacity_factor=capacity_factor, dropless=dropless,
                                 bias_balancing=bias_balancing, bias_update_rate=bias_update_rate)
        self.dispatcher = TokenDispatcher(num_experts, ep_group, async_a2a=async_a2a, chunks=a2a_chunks)
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, dim, hidden_dim)
        self.shared_expert = FeedForward(dim, hidden_dim) if shared_expert else None

    @property
    def num_local_experts(self) -> int:
        return self.dispatcher.num_local_experts

    @property
    def expert_offset(self) -> int:
        """Global index of this rank's first expert; its experts are [offset, offset + num_local)."""
        return self.dispatcher.expert_offset

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        routing = self.router(x)
        shared = (lambda: self.shared_expert(x)) if self.shared_expert is not None else None
        per_assignment, shared_out = self.dispatcher(x, routing.expert_ids, routing.keep, self.experts, shared)
        N, k = routing.expert_ids.shape
        weights = routing.weights.to(per_assignment.dtype)  # fp32 gates; cast for the combine only
        out = (per_assignment.view(N, k, -1) * weights.unsqueeze(-1)).sum(1)  # [N, D]
        if shared_out is not None:
            out = out + shared_out
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.counts, routing.kept_counts)
        return out.view(shape), stats


def reference_moe_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The naive formulation, for tests and benchmarks: loop over experts, gather the tokens that
    chose each one (boolean mask), run it, scatter-add weight x output. Same routing as ``layer``."""
    import torch.nn.functional as F

    routing = layer.router(x)
    out = torch.zeros_like(x)
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    for e in range(layer.num_local_experts):
        token_idx, slot = torch.nonzero((routing.expert_ids == e) & routing.keep, as_tuple=True)
        y = (F.silu(x[token_idx] @ w1[e]) * (x[token_idx] @ w3[e])) @ w2[e]
        out = out.index_add(0, token_idx, y * routing.weights[token_idx, slot, None])
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(x)
    return out
