"""Top-k softmax router in fp32, with capacity, Switch load-balancing loss, z-loss and bias balancing."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from components.model.dispatch import expert_histogram


@dataclass
class Routing:
    """Where each of N tokens goes. Assignments are token-major: row n holds token n's k choices."""

    expert_ids: torch.Tensor   # [N, k] long, global expert index
    weights: torch.Tensor      # [N, k] fp32 gate weights (0 for dropped assignments)
    keep: torch.Tensor         # [N, k] bool, False = dropped by capacity
    counts: torch.Tensor       # [E] long, assignments per expert *before* capacity
    kept_counts: torch.Tensor  # [E] long, assignments per expert after capacity
    aux_loss: torch.Tensor     # scalar fp32, Switch balancing loss (unweighted)
    z_loss: torch.Tensor       # scalar fp32, router z-loss (unweighted)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: capacity_factor x the perfectly balanced share of the N*k assignments."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments [N, k] fit into their expert's capacity.

    Priority follows GShard: every token's first choice before any second choice, and within
    a choice rank earlier tokens first. Positions inside an expert come from a stable sort, so
    no [N*k, E] one-hot is built.
    """
    N, k = expert_ids.shape
    flat = expert_ids.t().reshape(-1)  # [k*N], choice-major = priority order
    order = torch.argsort(flat, stable=True)
    counts = expert_histogram(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts  # first sorted slot of each expert
    position_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    position = torch.empty_like(position_sorted)
    position[order] = position_sorted
    return (position < capacity).view(k, N).t()


class TopKRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, *, capacity_factor: float = 1.25,
                 dropless: bool = False, bias_balancing: bool = False, bias_update_rate: float = 1e-3):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dropless = dropless
        self.bias_balancing = bias_balancing
        self.bias_update_rate = bias_update_rate
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias that only shifts *which*
        # experts are selected, never the gate weights; nudged after each training step.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, D] -> Routing. All router math in fp32, whatever autocast says."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x.float() @ self.gate.weight.float().t()  # [N, E]
            probs = logits.softmax(dim=-1)
            scores = probs + self.expert_bias if self.bias_balancing else probs
            _, expert_ids = scores.topk(self.top_k, dim=-1)  # [N, k]
            weights = probs.gather(-1, expert_ids)
            if self.top_k > 1:
                # renormalise among the chosen experts (Mixtral/DeepSeek); with k=1 keep the raw
                # probability (Switch) so the router still receives a gradient from the task loss
                weights = weights / weights.sum(-1, keepdim=True)

            N = x.shape[0]
            counts = expert_histogram(expert_ids, self.num_experts)  # bincount would sync on CUDA
            # Switch balancing loss: E * sum_i f_i * P_i (f: fraction of assignments, P: mean prob)
            fraction = counts.float() / max(N * self.top_k, 1)
            mean_prob = probs.mean(0) if N else probs.sum(0)
            aux_loss = self.num_experts * (fraction * mean_prob).sum()
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean() if N else logits.sum()

            # Capacity applies to training only: at inference every token reaches its experts, so
            # a sequence's output never depends on what else is in the batch (KV-cache decoding).
            if self.dropless or not self.training:
                keep = torch.ones_like(expert_ids, dtype=torch.bool)
            else:
                capacity = expert_capacity(N, self.num_experts, self.top_k, self.capacity_factor)
                keep = capacity_keep_mask(expert_ids, self.num_experts, capacity)
            weights = weights * keep
            kept_counts = expert_histogram(expert_ids, self.num_experts, weights=keep)

        if self.bias_balancing and self.training and torch.is_grad_enabled():
            self.update_bias(counts)
        return Routing(expert_ids, weights, keep, counts, kept_counts, aux_loss, z_loss)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Move the bias toward uniform load: up for underloaded experts, down for overloaded.

        Counts are summed over all data-parallel ranks first so every replica of the router
        keeps the same bias (it is a buffer, not a gradient-synchronised parameter).
        """
        counts = counts.float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.clone()
            dist.all_reduce(counts)
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
