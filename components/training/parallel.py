"""Process groups for expert parallelism, DDP on the non-expert parameters, expert-gradient sync.

With world size W and expert-parallel size E (E divides W):

* expert-parallel (EP) groups are contiguous ranks ``[0..E-1], [E..2E-1], ...``; within one, each
  rank holds ``num_experts / E`` experts and tokens travel to their expert by all-to-all;
* expert-data-parallel (EDP) groups hold the same experts: ``{i, i+E, i+2E, ...}``; expert
  gradients are averaged only there;
* every other parameter is replicated on all W ranks and synchronised by DDP
  (``train.data_parallel=ddp``), or sharded over all W ranks by FSDP2 (``fsdp``, :func:`wrap_fsdp`),
  in which case each expert shard is also sharded over its EDP group.

FSDP2 runs on gloo/CPU in torch 2.13 (tests/unit/training/test_fsdp.py trains with it); both
paths give the same loss curve there. DDP stays the CPU default: on CPU the sharding saves memory
nobody is short of, and DDP has one collective per bucket instead of FSDP's all-gather +
reduce-scatter per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from components.model.experts import is_expert_param, mark_expert


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    ep_size: int
    ep_rank: int  # position inside this rank's EP group = which expert shard it holds
    ep_group: object | None  # None when ep_size == 1 (no all-to-all)
    edp_size: int  # replicas of this rank's expert shard = world_size / ep_size
    edp_group: object | None  # None when edp_size == 1 (nothing to average)
    edp_ranks: tuple[int, ...]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def build_groups(ep_size: int) -> ParallelGroups:
    """Create the EP and EDP groups; every rank must call this with the same ``ep_size``."""
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise ValueError(
                f"train.expert_parallel_size={ep_size}: needs an initialised process group of "
                "that size"
            )
        return ParallelGroups(0, 1, 1, 0, None, 1, None, (0,))
    rank, world = dist.get_rank(), dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(
            f"train.expert_parallel_size={ep_size}: must divide the world size ({world})"
        )
    ep_group = edp_group = None
    # new_group is collective: all ranks create all groups, in the same order.
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        group = dist.new_group(ranks) if ep_size > 1 else None
        if rank in ranks:
            ep_group = group
    edp_size = world // ep_size
    my_edp_ranks: tuple[int, ...] = ()
    for offset in range(ep_size):
        ranks = list(range(offset, world, ep_size))
        group = dist.new_group(ranks) if edp_size > 1 else None
        if rank in ranks:
            edp_group, my_edp_ranks = group, tuple(ranks)
    return ParallelGroups(
        rank, world, ep_size, rank % ep_size, ep_group, edp_size, edp_group, my_edp_ranks
    )


def expert_param_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if is_expert_param(p)]


def split_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(non-expert, expert) parameters that need gradients."""
    dense, experts = [], []
    for p in model.parameters():
        if p.requires_grad:
            (experts if is_expert_param(p) else dense).append(p)
    return dense, experts


def wrap_ddp(
    model: nn.Module, groups: ParallelGroups, device: torch.device, bucket_mb: int
) -> nn.Module:
    """DDP over the non-expert parameters only; the expert parameters are left to
    :func:`sync_expert_grads`. Gradients of a bucket are all-reduced as soon as the bucket is
    ready, overlapping the rest of backward (``bucket_mb`` sets the bucket size)."""
    if not groups.distributed:
        return model
    # Private on purpose: DDP has no public argument to leave parameters out (its
    # delay_all_reduce_named_params / skip_all_reduce_unused_params still all-reduce them over
    # every rank, which would average different experts together). The public alternatives change
    # more than they fix: a wrapper module without the experts breaks the state dict, and FSDP2's
    # fully_shard(ignored_params=...) replaces DDP's overlap and bucketing.
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_mb,
        # buffers (rotary tables, router bias) are deterministic or synchronised by the model:
        # broadcasting them every forward would be a collective for nothing (synced once at init).
        forward_sync_buffers=False,
        gradient_as_bucket_view=True,
    )


def wrap_fsdp(
    model: nn.Module, groups: ParallelGroups, device: torch.device, param_dtype: torch.dtype | None
) -> nn.Module:
    """FSDP2 (``fully_shard``) in place, torchtitan's layout for MoE; returns ``model``.

    * each MoE layer's experts: sharded over their expert-data-parallel group (the ranks holding
      the same expert shard; a group of one when ``ep_size == world_size``), gradients summed
      there and divided by W, i.e. what :func:`sync_expert_grads` computes for DDP;
    * each block (attention, norms, router, shared expert or dense FFN), then the root
      (embedding, final norm, output): sharded over all W ranks, gradients averaged over W.

    Parameters are fp32 (master weights; AdamW state is sharded with them). ``param_dtype``
    (bf16 under ``precision=bf16``) is the dtype FSDP all-gathers them in for compute, once per
    block per forward (the expert weights too: no per-call re-cast); gradient reductions stay
    fp32. Build the optimizer *after* this call: the parameters become DTensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not groups.distributed:
        return model
    expert_names = set(expert_param_names(model))
    # rank r = edp_index * ep_size + ep_rank: "ep" rows are the contiguous EP groups of
    # build_groups and "edp" columns its expert-data-parallel groups
    mesh = init_device_mesh(
        device.type, (groups.edp_size, groups.ep_size), mesh_dim_names=("edp", "ep")
    )
    dp_mesh = init_device_mesh(device.type, (groups.world_size,), mesh_dim_names=("dp",))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        moe = getattr(block, "moe", None)
        if moe is not None:
            fully_shard(moe.experts, mesh=mesh["edp"], mp_policy=policy)
            moe.experts.set_gradient_divide_factor(float(groups.world_size))
            if dist.get_backend() == "gloo" and groups.edp_size > 1:
                # a custom divide factor makes FSDP2 reduce with PREMUL_SUM, which NCCL has and
                # gloo has not: sum, then divide (feature-detected: newer than torch 2.11?).
                # Not on a one-rank group, where no collective runs: set there, the expert
                # gradients come out wrong (test_fsdp.py's curve left DDP's from step 8)
                force_sum = getattr(moe.experts, "set_force_sum_reduction_for_comms", None)
                if force_sum is None:
                    raise RuntimeError(
                        "train.data_parallel=fsdp with expert replicas over gloo needs "
                        "FSDPModule.set_force_sum_reduction_for_comms (a newer torch)"
                    )
                force_sum(True)
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    # fully_shard replaces each parameter by a DTensor one: carry the expert tag over
    for name, param in model.named_parameters():
        if name in expert_names:
            mark_expert(param)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back on every unit. A forward without backward (evaluation
    under no_grad) leaves the root unit's parameters gathered, as plain tensors in place of the
    DTensor ones the optimizer holds: reshard before reading parameters by name (checkpoints)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP-sharded) tensor: a view, so in-place ops write
    through."""
    return t.to_local() if isinstance(t, DTensor) else t


def sync_expert_grads(expert_params: list[torch.Tensor], groups: ParallelGroups) -> None:
    """Average expert gradients consistently with DDP's average over all W ranks.

    After backward, the all-to-all has already brought the gradients of every token in the EP
    group to the rank owning the expert, so a shard holds the sum over its EP group's ranks of
    d(loss_rank)/d(expert). Summing over the EDP group adds the other EP groups; dividing by W
    gives the gradient of the mean loss over all ranks, exactly what DDP computes for the rest.
    """
    if not groups.distributed:
        return
    if any(isinstance(p, DTensor) for p in expert_params):
        return  # FSDP2 reduce-scattered them during backward (wrap_fsdp)
    for p in expert_params:
        # An expert no token reached has no gradient here but may have one on a replica:
        # every replica must contribute the same tensor sizes to the all-reduce.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in expert_params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if groups.edp_group is not None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=groups.edp_group)
    flat.div_(groups.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


class ExpertGradReducer:
    """:func:`sync_expert_grads` started during backward: expert gradients in buckets of about
    ``bucket_mb``, each all-reduced (asynchronously) in the expert-data-parallel group as soon
    as all its gradients are accumulated, while backward goes on with earlier layers; what DDP
    does for the rest. :meth:`finish` waits, divides by W and writes the results back.

    Buckets follow the reverse parameter order (backward reaches the last layers first) and are
    launched strictly in that order (a bucket that completes early waits for the ones before
    it), so every rank of a group issues the same collectives in the same sequence. Armed only
    for the micro-batch whose backward should synchronise (:meth:`arm`), like DDP's no_sync.
    """

    def __init__(self, expert_params: list[torch.Tensor], groups: ParallelGroups, bucket_mb: float):
        if groups.edp_group is None:
            raise ValueError("ExpertGradReducer needs an expert-data-parallel group of size > 1")
        self.groups = groups
        self.buckets: list[list[torch.Tensor]] = []
        limit, size = bucket_mb * 2**20, 0.0
        for p in reversed(expert_params):
            nbytes = p.numel() * p.element_size()
            if not self.buckets or (size + nbytes > limit and self.buckets[-1]):
                self.buckets.append([])
                size = 0.0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in expert_params]
        self.armed = False
        self.launched_in_backward = 0  # buckets started by the hooks (the overlapped ones)
        self._reset()

    def _reset(self) -> None:
        self._missing = [len(b) for b in self.buckets]
        self._next = 0
        self._inflight: list[tuple[torch.Tensor, object, list[torch.Tensor]]] = []

    def arm(self, on: bool) -> None:
        self.armed = on

    def _ready(self, param: torch.Tensor) -> None:
        if not self.armed:
            return
        self._missing[self._bucket_of[id(param)]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)
            self.launched_in_backward += 1

    def _launch(self, index: int) -> None:
        params = self.buckets[index]
        for p in params:
            if p.grad is None:  # see sync_expert_grads: same sizes on every replica
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        work = dist.all_reduce(
            flat, op=dist.ReduceOp.SUM, group=self.groups.edp_group, async_op=True
        )
        self._inflight.append((flat, work, params))
        self._next = index + 1

    def finish(self) -> None:
        """Launch what backward did not complete, wait for all, average; then disarm."""
        while self._next < len(self.buckets):
            self._launch(self._next)
        for flat, work, params in self._inflight:
            work.wait()
            flat.div_(self.groups.world_size)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        self._reset()
        self.armed = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def global_grad_norm(
    dense_params: list[torch.Tensor], expert_params: list[torch.Tensor], groups: ParallelGroups
) -> torch.Tensor:
    """L2 norm of the *whole* model's gradient, bitwise identical on every rank (a 0-dim tensor).

    Non-expert gradients are identical on all W ranks (DDP); each expert shard's gradient is
    identical on its ``edp_size`` replicas. Weighting the local squares by 1/W and 1/edp_size
    and summing over all ranks counts every gradient exactly once, in one all-reduce — and an
    all-reduce hands every rank the same result, so an inf/NaN anywhere (one rank's overflowing
    expert) makes the norm non-finite on *every* rank, and every rank takes the same decision.
    """
    device = next(iter(dense_params + expert_params)).device

    def sq_norm(params: list[torch.Tensor]) -> torch.Tensor:
        # FSDP2: this rank's shard of each gradient (the shards of all ranks are disjoint)
        grads = [local(p.grad.detach()) for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().pow(2)

    dense_sq, expert_sq = sq_norm(dense_params), sq_norm(expert_params)
    if not groups.distributed:
        return (dense_sq + expert_sq).sqrt()
    # a replicated gradient counts once per copy, a sharded one once in all
    dense_copies = 1 if any(isinstance(p, DTensor) for p in dense_params) else groups.world_size
    expert_copies = 1 if any(isinstance(p, DTensor) for p in expert_params) else groups.edp_size
    total_sq = dense_sq / dense_copies + expert_sq / expert_copies
    dist.all_reduce(total_sq, op=dist.ReduceOp.SUM)
    return total_sq.sqrt()


def clip_grad_norm(
    dense_params: list[torch.Tensor],
    expert_params: list[torch.Tensor],
    max_norm: float,
    groups: ParallelGroups,
) -> torch.Tensor:
    """Clip by the global norm (:func:`global_grad_norm`) and return it; ``max_norm <= 0`` only
    measures.

    A non-finite norm scales nothing (the step will be skipped on every rank): multiplying by
    ``max_norm / inf = 0`` would turn an inf into NaN, and the verdict stays on the device.
    """
    total = global_grad_norm(dense_params, expert_params, groups)
    if max_norm > 0:
        usable = torch.where(
            torch.isfinite(total), total, torch.zeros_like(total)
        )  # 0: coefficient clamps to 1
        params = dense_params + expert_params
        if any(isinstance(p, DTensor) for p in params):
            # the norm is already global: scale each rank's shard (torch's clip would treat
            # the DTensor gradients as needing a redistribution against a plain-tensor norm)
            coef = (max_norm / (usable + 1e-6)).clamp(max=1.0)
            for p in params:
                if p.grad is not None:
                    local(p.grad).mul_(coef)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, usable)
    return total


def all_reduce_sum(values: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    if groups.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
