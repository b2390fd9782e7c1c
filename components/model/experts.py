"""The experts of one MoE layer on this rank, stored as batched [num_local_experts, ...] weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mark_expert(param: nn.Parameter) -> nn.Parameter:
    """Tag a parameter as expert-sharded: synchronised in its expert-data-parallel group, not by DDP."""
    param._moeops_expert = True
    return param


def is_expert_param(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_moeops_expert", False))


class GroupedExperts(nn.Module):
    """SwiGLU experts; tokens arrive already grouped by expert (contiguous rows per expert).

    Each expert runs one matmul over its whole group of rows: a grouped GEMM written as a
    loop over the (few) local experts, never over tokens.
    """

    def __init__(self, num_local_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.w1 = mark_expert(nn.Parameter(torch.empty(num_local_experts, dim, hidden_dim)))
        self.w3 = mark_expert(nn.Parameter(torch.empty(num_local_experts, dim, hidden_dim)))
        self.w2 = mark_expert(nn.Parameter(torch.empty(num_local_experts, hidden_dim, dim)))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [M, D] grouped by local expert, counts[e] rows each (sum = M) -> [M, D]."""
        if len(counts) != self.num_local_experts or sum(counts) != x.shape[0]:
            raise ValueError(f"counts {counts} do not describe {x.shape[0]} rows over {self.num_local_experts} experts")
        outputs = []
        # unbind once: indexing w[e] per expert would make backward allocate a full-size
        # [E, ...] zero gradient per expert; unbind's backward is a single stack
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        for e, rows in enumerate(torch.split(x, counts)):
            if rows.shape[0] == 0:
                continue
            hidden = F.silu(rows @ w1[e]) * (rows @ w3[e])  # [m, F]
            outputs.append(hidden @ w2[e])  # [m, D]
        if not outputs:
            # keep expert weights in the graph so backward (and DDP-like syncs) see a gradient
            # no rows at all: keep both x and the weights in the autograd graph. x: under expert
            # parallelism x came out of an all-to-all whose backward must run on every rank (a
            # collective), even on a rank that received nothing. Weights: every rank gets a
            # (zero) gradient for the expert-data-parallel all-reduce.
            anchor = x.sum() + self.w1.sum() + self.w3.sum() + self.w2.sum()
            return x.new_zeros(x.shape) + 0.0 * anchor
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
