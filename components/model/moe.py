"""The MoE feed-forward layer: router -> token dispatch -> grouped experts -> fp32 scatter-add
combine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from components.config.schema import ModelConfig, OverlapConfig
from components.model.dispatch import TokenDispatcher
from components.model.experts import GroupedExperts
from components.model.layers import FeedForward
from components.model.router import TopKRouter


@dataclass
class MoEStats:
    """What one MoE layer reports per forward (local tokens of this rank); all device tensors."""

    aux_loss: torch.Tensor  # scalar, unweighted Switch balancing loss
    z_loss: torch.Tensor  # scalar, unweighted router z-loss
    counts: torch.Tensor  # [E] assignments routed to each expert (before capacity)
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
    """Top-k routed SwiGLU experts (``cfg.num_experts`` of hidden size ``cfg.ffn_dim``), optionally
    sharded over an expert-parallel group, plus an optional always-on shared expert. Dropped
    assignments contribute zero, so a token dropped by every chosen expert passes through the
    block's residual unchanged.

    ``overlap``: the ``train.overlap`` section; ``None`` means its schema defaults.
    """

    def __init__(self, cfg: ModelConfig, ep_group=None, overlap: OverlapConfig | None = None):
        super().__init__()
        overlap = overlap if overlap is not None else OverlapConfig()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = TopKRouter(
            cfg.dim,
            cfg.num_experts,
            cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            dropless=cfg.dropless,
            bias_balancing=cfg.bias_balancing,
            bias_update_rate=cfg.bias_update_rate,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        self.dispatcher = TokenDispatcher(cfg.num_experts, ep_group, overlap)
        self.experts = GroupedExperts(
            self.dispatcher.num_local_experts, cfg.dim, cfg.ffn_dim, cfg.expert_backend
        )
        self.shared_expert = FeedForward(cfg.dim, cfg.ffn_dim) if cfg.shared_expert else None

    @property
    def num_local_experts(self) -> int:
        return self.dispatcher.num_local_experts

    @property
    def expert_offset(self) -> int:
        """Global index of this rank's first expert; its experts are [offset, offset +
        num_local)."""
        return self.dispatcher.expert_offset

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        routing = self.router(x)
        # fp32 [N, D]: gate-weighted expert outputs (+ shared expert), accumulated in fp32
        out = self.dispatcher(
            x, routing.expert_ids, routing.weights, routing.keep, self.experts, self.shared_expert
        )
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.counts, routing.kept_counts)
        return out.to(x.dtype).view(shape), stats
