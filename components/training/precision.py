"""Mixed precision under expert parallelism: autocast, and an fp16 loss scaler whose verdict all
ranks share.

bf16 needs no scaler. fp16 does, and expert parallelism breaks the stock one: ``GradScaler``
decides "inf/NaN found, skip this step" from its own rank's gradients, but each rank's expert
gradients are different tensors (its shard). An overflow in rank 0's experts would make rank 0
skip while rank 1 steps, the replicated weights would drift apart, and the scale factors too —
and with different scales, the gradients that reach an expert through the all-to-all (scaled
on the sending rank) would be unscaled with the wrong factor. So under a process group the
scaler is torch's ``ShardedGradScaler``: its ``unscale_`` all-reduces the inf/NaN flag over
all ranks before anyone steps, so every rank skips together and keeps the same scale.
(``ShardedGradScaler`` was written for FSDP, but the agreement it adds is exactly what any
sharded-parameter layout needs; it works on plain parameters.)
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from components.training.parallel import ParallelGroups

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on ``device``; fp32 runs without autocast.

    Training on CPU is fp32 (``validate`` refuses mixed precision without a GPU: CPU autocast is
    slow and unrepresentative); tests call this with ``device=cpu`` to run the fp16 logic for real.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler_for(precision: str, device: torch.device, groups: ParallelGroups):
    """None unless fp16; a scaler whose inf/NaN verdict is agreed over all ranks when
    distributed."""
    if autocast_dtype(precision) is not torch.float16:
        return None
    if groups.distributed:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, process_group=dist.group.WORLD)
    return torch.amp.GradScaler(device.type)
