"""One optimizer step over ``grad_accum_steps`` micro-batches, identical on every rank.

    forward + backward per micro-batch (DDP / FSDP2 sync only on the last; counts and losses stay
    on the device)
    -> expert-gradient all-reduce in the expert-data-parallel group: started bucket by bucket
       during the last micro-batch's backward (ExpertGradReducer), awaited here; FSDP2 has
       reduce-scattered them during backward
    -> fp16: unscale, with the inf/NaN verdict all-reduced over all ranks (ShardedGradScaler)
    -> global grad norm (one all-reduce, identical on every rank) and clipping
    -> step, or skip on *every* rank when the global norm is not finite
       (the router-bias update runs as the optimizer's pre-step hook, so a skipped step moves
       nothing)
    -> scaler update (same verdict everywhere: same scale), zero grads, LR schedule

The only host synchronisation of a step is reading that verdict (``bool(isfinite(norm))``):
the host must know whether to call ``optimizer.step()``. GradScaler's own ``step`` reads its
inf flag the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from components.model.router import ExpertBiasBalancer
from components.training.loss import chunked_cross_entropy
from components.training.metrics import IntervalMetrics, StepTimer
from components.training.parallel import (
    ExpertGradReducer,
    ParallelGroups,
    clip_grad_norm,
    is_fsdp,
    split_params,
    sync_expert_grads,
)


@dataclass
class StepParts:
    """Everything a step touches. ``model`` is the plain module, ``wrapped`` the DDP one (or the
    same)."""

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    groups: ParallelGroups
    grad_clip: float
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: torch.amp.GradScaler | None = None
    balancer: ExpertBiasBalancer | None = None
    dense_params: list[torch.Tensor] = field(default_factory=list)
    expert_params: list[torch.Tensor] = field(default_factory=list)
    # DDP path with expert replicas: expert gradients all-reduced during backward (None: after)
    expert_reducer: ExpertGradReducer | None = None

    def __post_init__(self):
        if not self.dense_params and not self.expert_params:
            self.dense_params, self.expert_params = split_params(self.model)


def build_balancer(model: nn.Module, optimizer: torch.optim.Optimizer) -> ExpertBiasBalancer:
    """The bias balancer of the model's routers, hooked to run before every ``optimizer.step()``."""
    routers = [layer.router for layer in model.moe_layers()] if hasattr(model, "moe_layers") else []
    balancer = ExpertBiasBalancer(routers)
    if balancer.enabled:
        balancer.attach(optimizer)
    return balancer


def forward_backward(
    parts: StepParts,
    micro_batches: Iterable[torch.Tensor],
    accum: int,
    metrics: IntervalMetrics,
    timer: StepTimer | None = None,
) -> None:
    """Forward and backward over ``accum`` micro-batches ``[B, T + 1]`` (gradients accumulate).

    The loss of each micro-batch is divided by ``accum``: the step's gradient is that of the mean
    over all its micro-batches, as one batch ``accum`` times larger would give (with dropless
    routing; capacity and the batch-level Switch loss are per micro-batch by design)."""
    timer = timer or StepTimer(torch.device("cpu"))
    wrapped, model = parts.wrapped, parts.model
    batches = iter(micro_batches)
    for micro in range(accum):
        with timer.phase("data_wait", host=True):
            batch = next(batches)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        # DDP all-reduces (FSDP2 reduce-scatters) only on the last micro-batch; earlier ones
        # just accumulate
        last_micro = micro == accum - 1
        no_sync = contextlib.nullcontext()
        if parts.expert_reducer is not None:
            parts.expert_reducer.arm(last_micro)
        if is_fsdp(wrapped):
            wrapped.set_requires_gradient_sync(last_micro)
        elif not last_micro and wrapped is not model:
            no_sync = wrapped.no_sync()
        with timer.phase("compute"), no_sync:
            with parts.autocast():
                logits, aux = wrapped(inputs)  # [B, T, V]
            # fp32 math, chunked: no full fp32 copy of bf16 logits kept for backward
            ce = chunked_cross_entropy(logits, targets)
            loss = (ce + aux["aux_loss"] + aux["z_loss"]) / accum
            (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()
        metrics.add_micro_batch(ce, aux, accum)
        if parts.balancer is not None:
            parts.balancer.accumulate(aux.get("expert_counts", []))


def optimizer_step(parts: StepParts, timer: StepTimer | None = None) -> tuple[torch.Tensor, bool]:
    """Synchronise, check, clip and apply the accumulated gradients. Returns (global grad norm,
    stepped).

    Every rank reaches the same verdict: the norm comes out of one all-reduce, so it is the same
    number everywhere, and fp16's inf flag is all-reduced too."""
    timer = timer or StepTimer(torch.device("cpu"))
    with timer.phase("comm"):
        if parts.expert_reducer is not None:
            parts.expert_reducer.finish()  # only waits for what backward has not hidden
        else:
            sync_expert_grads(parts.expert_params, parts.groups)
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    with timer.phase("comm"):
        norm = clip_grad_norm(
            parts.dense_params, parts.expert_params, parts.grad_clip, parts.groups
        )
    stepped = bool(torch.isfinite(norm))  # the step's one host sync (see the module docstring)
    with timer.phase("compute"):
        if stepped:
            if parts.scaler is not None:
                parts.scaler.step(parts.optimizer)
            else:
                parts.optimizer.step()
        elif parts.balancer is not None:
            parts.balancer.discard()  # a skipped step's routing must not move the bias later
        if parts.scaler is not None:
            parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.scheduler is not None:
            parts.scheduler.step()
    return norm, stepped


def train_step(
    parts: StepParts,
    micro_batches: Iterable[torch.Tensor],
    accum: int,
    metrics: IntervalMetrics,
    timer: StepTimer | None = None,
) -> bool:
    """One optimizer step; returns whether the weights moved (False: skipped on every rank)."""
    forward_backward(parts, micro_batches, accum, metrics, timer)
    norm, stepped = optimizer_step(parts, timer)
    metrics.end_step(norm, skipped=not stepped)
    return stepped
