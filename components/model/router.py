"""Top-k softmax router in fp32, with capacity, Switch load-balancing loss, z-loss and bias
balancing.

Bias balancing (DeepSeek-V3's auxiliary-loss-free method) never changes anything inside forward:
the forward only *uses* ``expert_bias`` and returns its expert counts. :class:`ExpertBiasBalancer`
sums the counts of a step's micro-batches and moves every router's bias once per optimizer step,
from an optimizer pre-step hook, with one all-reduce for all layers (as torchtitan does).
Because the counts travel through the forward's *return value*, a forward recomputed under
activation checkpointing (whose outputs autograd discards) is never counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from components.model.dispatch import expert_histogram


@dataclass
class Routing:
    """Where each of N tokens goes. Assignments are token-major: row n holds token n's k choices."""

    expert_ids: torch.Tensor  # [N, k] long, global expert index
    weights: torch.Tensor  # [N, k] fp32 gate weights (0 for dropped assignments)
    keep: torch.Tensor  # [N, k] bool, False = dropped by capacity
    counts: torch.Tensor  # [E] long, assignments per expert *before* capacity
    kept_counts: torch.Tensor  # [E] long, assignments per expert after capacity
    aux_loss: torch.Tensor  # scalar fp32, Switch balancing loss (unweighted)
    z_loss: torch.Tensor  # scalar fp32, router z-loss (unweighted)


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
    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float = 1.25,
        dropless: bool = False,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dropless = dropless
        self.bias_balancing = bias_balancing
        self.bias_update_rate = bias_update_rate
        self.routed_scaling_factor = routed_scaling_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias that only shifts *which*
        # experts are selected, never the gate weights; moved by ExpertBiasBalancer once per
        # optimizer step (a buffer: identical on every rank because every rank applies the same
        # all-reduced counts).
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
            if self.routed_scaling_factor != 1.0:
                # after renormalising (DeepSeek-V3): k weights summing to 1 average k experts'
                # outputs; the factor scales that back up to a sum's size
                weights = weights * self.routed_scaling_factor

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

        return Routing(expert_ids, weights, keep, counts, kept_counts, aux_loss, z_loss)


class ExpertBiasBalancer:
    """Moves the routers' ``expert_bias`` toward uniform load once per optimizer step.

    ``accumulate(counts)`` after each micro-batch's forward (``counts``: one ``[E]`` tensor per
    MoE layer, this rank's assignments before capacity, as the model returns them); ``attach
    (optimizer)`` registers :meth:`update` as an optimizer pre-step hook, so a step that is
    skipped (fp16 overflow, non-finite gradient norm) moves no bias; :meth:`discard` then drops
    the skipped step's counts. Everything stays on the counts' device; the only communication is
    one all-reduce of the stacked ``[L, E]`` counts per optimizer step over ``group`` (default:
    all ranks: the routers are replicated everywhere, so every replica must see the global load).
    """

    def __init__(self, routers: Sequence[TopKRouter], group=None):
        self.routers = [r for r in routers if r.bias_balancing]
        self.group = group
        self.pending: torch.Tensor | None = None  # [L, E] float, summed over micro-batches
        self.updates = 0  # optimizer steps that moved the bias

    @property
    def enabled(self) -> bool:
        return bool(self.routers)

    @torch.no_grad()
    def accumulate(self, counts: Sequence[torch.Tensor]) -> None:
        if not self.enabled:
            return
        if len(counts) != len(self.routers):
            raise ValueError(
                f"got expert counts of {len(counts)} MoE layers for {len(self.routers)} balanced "
                "routers"
            )
        stacked = torch.stack([c.detach().float() for c in counts])  # [L, E]
        self.pending = stacked if self.pending is None else self.pending + stacked

    def discard(self) -> None:
        self.pending = None

    @torch.no_grad()
    def update(self) -> None:
        """All-reduce the step's counts once and nudge each bias by ``rate * sign(mean - count)``:
        up for underloaded experts, down for overloaded ones."""
        if self.pending is None:
            return
        counts = self.pending
        self.pending = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(counts, group=self.group)
        for router, layer_counts in zip(self.routers, counts):
            delta = torch.sign(layer_counts.mean() - layer_counts)
            router.expert_bias.add_(router.bias_update_rate * delta.to(router.expert_bias.dtype))
        self.updates += 1

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`update` right before every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_pre_hook(lambda _optimizer, _args, _kwargs: self.update())
