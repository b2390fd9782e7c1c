"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate
schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from components.config.schema import TrainConfig


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    router_lr_scale: float = 1.0,
    expert_lr_scale: float = 1.0,
) -> list[dict]:
    """Two groups: matrices decay; norms, biases and embeddings do not. A scale other than 1 puts
    the routers' gate matrices (``router_lr_scale``) or the routed experts' weights
    (``expert_lr_scale``) in a group of their own (decayed) at ``lr x scale``; at 1 they stay
    among the matrices, so the groups (and the checkpoints' optimizer state) are those of a model
    without the option.

    Decaying a norm's gain or a bias pulls it towards zero for no regularising benefit, and
    decaying the (possibly tied) embedding shrinks rare tokens' vectors every step.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def ids(scale: float, is_member) -> set[int]:
        if scale == 1.0:
            return set()
        return {id(p) for name, p in model.named_parameters() if is_member(name)}

    router_ids = ids(router_lr_scale, lambda name: name.endswith("router.gate.weight"))
    expert_ids = ids(expert_lr_scale, lambda name: ".moe.experts." in name)
    decay, no_decay, router, experts = [], [], [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in router_ids:
            router.append(param)
        elif id(param) in expert_ids:
            experts.append(param)
        elif param.ndim < 2 or id(param) in embedding_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    for params, scale in ((router, router_lr_scale), (experts, expert_lr_scale)):
        if params:
            if lr is None:
                raise ValueError("param_groups: a router or expert lr scale needs the base lr")
            groups.append({"params": params, "weight_decay": weight_decay, "lr": lr * scale})
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(
            model, train.weight_decay, train.lr, train.router_lr_scale, train.expert_lr_scale
        ),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        **_kernel(model),
    )


def _kernel(model: nn.Module) -> dict[str, bool]:
    """fused on CUDA (one kernel for the whole update); foreach elsewhere (one kernel per group
    instead of per tensor; also fine on CPU)."""
    on_cuda = all(p.device.type == "cuda" for p in model.parameters())
    return {"fused": True} if on_cuda else {"foreach": True}


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate before optimiser step ``step`` (0-based).

    Linear warmup from 1/warmup to 1, then a cosine from 1 down to ``min_lr_ratio`` at
    ``max_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, train.warmup_steps, train.max_steps, train.min_lr_ratio),
    )


def gathered(value: torch.Tensor, to_host: bool) -> torch.Tensor | None:
    """The whole of a tensor FSDP2 may have sharded (a DTensor: an all-gather over its mesh, so
    every rank of that mesh calls this in the same order), copied to the host only when
    ``to_host``: ranks that write nothing skip the device-to-host copy."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu() if to_host else None


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``param``: same device and dtype, and this rank's
    shard when FSDP2 sharded ``param`` (cut locally: every rank holds the full tensor)."""
    value = value.to(device=param.device, dtype=param.dtype, copy=True)
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    keep: Callable[[str], bool] | None = None,
) -> dict[str, dict]:
    """``{param name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}``.

    Keyed by name rather than by position so that a subset (the expert shard) can be saved by
    one rank, merged with other ranks' shards and re-split for another expert-parallel size.
    ``names`` maps ``id(param)`` to its name. Tensors are copied to the CPU (for saving), never
    cloned on the accelerator; on a CPU run they are the live tensors, so save them at once.
    ``keep(name)``: the parameters whose state this rank writes (default all); the others are
    only gathered where FSDP2 shards them (a collective), never copied.
    """
    by_name: dict[str, dict] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:
                name = names[id(param)]
                wanted = keep is None or keep(name)
                values = {
                    k: (gathered(v, wanted) if torch.is_tensor(v) else v) for k, v in state.items()
                }
                if wanted:
                    by_name[name] = values
    return by_name


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, names: dict[int, str], state: dict[str, dict]
) -> None:
    """Inverse of :func:`optimizer_state_by_name` for the params present in ``state``."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            saved = state.get(names[id(param)])
            if saved is None:
                continue
            restored = {}
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
                    if value.shape != param.shape:
                        raise ValueError(
                            f"optimizer state {names[id(param)]}.{key}: shape "
                            f"{tuple(value.shape)} does not "
                            f"match the parameter {tuple(param.shape)}"
                        )
                    value = like_param(value, param)
                elif torch.is_tensor(value):
                    value = (
                        value.clone()
                    )  # e.g. AdamW's step count; never keep a memory-mapped file's tensor
                restored[key] = value
            optimizer.state[param] = restored
