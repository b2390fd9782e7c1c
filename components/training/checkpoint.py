"""Training checkpoints that survive a change of expert-parallel size.

Layout of one checkpoint directory (Ray Train merges the files every rank reports into it):

    meta.json                       step, world/expert-parallel sizes, model config (rank 0)
    shared.pt                       non-expert weights + their optimiser state, scheduler,
                                    grad scaler (rank 0; identical on every rank)
    experts-<i>-of-<E>.pt           expert shard i of E: expert weights [E/EP, ...] and their
                                    optimiser moments, keyed by parameter name (first replica only)
    rank-<r>.pt                     RNG states and data-reader position of rank r
    flow_report.json                data-flow report of all ranks (final checkpoint only)

Expert tensors are stacked ``[num_local_experts, ...]`` with experts sharded contiguously, so
a full tensor is the concatenation of the shards along dim 0 in shard order, and a new shard
is a contiguous slice of it (``components.model.export.merge_expert_shards`` /
``shard_experts``). Loading at another EP size merges all shards and re-slices.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.model.export import merge_expert_shards, shard_experts
from components.training.optim import load_optimizer_state_by_name, optimizer_state_by_name
from components.training.parallel import ParallelGroups, expert_param_names

META_FILE = "meta.json"
SHARED_FILE = "shared.pt"
FLOW_REPORT_FILE = "flow_report.json"
FORMAT_VERSION = 1


def expert_file(ep_rank: int, ep_size: int) -> str:
    return f"experts-{ep_rank:03d}-of-{ep_size:03d}.pt"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclass
class Restored:
    """What a worker needs besides the weights and optimiser to continue where it stopped."""

    step: int
    reader_state: dict | None   # this rank's reader state (rank 0's when the world size changed)
    meta: dict


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------- resharding
# Weights go through the model's own helpers (components.model.export); optimiser moments are
# shaped like their parameters and are merged / re-split the same way, one moment at a time.

def _is_moment(value: Any) -> bool:
    """Adam's exp_avg / exp_avg_sq (shaped like the parameter), not its scalar step count."""
    return torch.is_tensor(value) and value.ndim > 0


def _merge_optimizer_shards(shards: list[dict[str, dict]]) -> dict[str, dict]:
    if not shards or not shards[0]:
        return {}
    merged: dict[str, dict] = {name: {} for name in shards[0]}
    for key in next(iter(shards[0].values())):
        per_shard = [{name: state[key] for name, state in shard.items()} for shard in shards]
        full = merge_expert_shards(per_shard) if _is_moment(next(iter(per_shard[0].values()))) else per_shard[0]
        for name, value in full.items():
            merged[name][key] = value
    return merged


def _shard_optimizer_state(full: dict[str, dict], ep_rank: int, ep_size: int) -> dict[str, dict]:
    out: dict[str, dict] = {name: {} for name in full}
    if not full:
        return out
    for key in next(iter(full.values())):
        moment = {name: state[key] for name, state in full.items()}
        if _is_moment(next(iter(moment.values()))):
            moment = shard_experts(moment, ep_rank, ep_size)
        for name, value in moment.items():
            out[name][key] = value
    return out


# ------------------------------------------------------------------------ save

def save_checkpoint(
    out_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    groups: ParallelGroups,
    step: int,
    reader_state: dict,
    meta: dict[str, Any],
    flow_report: list[dict] | None = None,
) -> Path:
    """Write this rank's part of the checkpoint of ``step`` into ``out_dir`` (``model`` unwrapped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expert_names = set(expert_param_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    optim_state = optimizer_state_by_name(optimizer, names)

    if groups.rank == 0:
        torch.save(
            {
                "model": {k: v for k, v in model_state.items() if k not in expert_names},
                "optimizer": {k: v for k, v in optim_state.items() if k not in expert_names},
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                # the reader's position is global (samples consumed by all ranks), so rank 0's
                # state also resumes a run at another world size
                "reader": reader_state,
            },
            out / SHARED_FILE,
        )
        full_meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": groups.world_size,
            "expert_parallel_size": groups.ep_size,
            "expert_param_names": sorted(expert_names),
        }
        (out / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        if flow_report is not None:
            (out / FLOW_REPORT_FILE).write_text(json.dumps(flow_report, indent=2))
    # One copy of each shard: its other replicas (the EDP group) hold the same tensors.
    if groups.rank < groups.ep_size:
        torch.save(
            {
                "model": {k: model_state[k] for k in expert_names},
                "optimizer": {k: v for k, v in optim_state.items() if k in expert_names},
            },
            out / expert_file(groups.ep_rank, groups.ep_size),
        )
    torch.save({"rng": rng_state(), "reader": reader_state, "step": step}, out / rank_file(groups.rank))
    return out


# ------------------------------------------------------------------------ load

def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a moeops training checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def _load(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    # weights_only=False: rank files hold numpy's RNG state, which the safe unpickler refuses;
    # only load checkpoints this project wrote.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_full_expert_state(ckpt_dir: str | Path, meta: dict | None = None) -> tuple[dict, dict]:
    """All expert shards merged: (expert weights [num_experts, ...], their optimiser state)."""
    ckpt_dir = Path(ckpt_dir)
    meta = meta or read_meta(ckpt_dir)
    ep_size = int(meta["expert_parallel_size"])
    shards = [_load(ckpt_dir / expert_file(i, ep_size)) for i in range(ep_size)]
    weights = merge_expert_shards([s["model"] for s in shards]) if shards[0]["model"] else {}
    optim = _merge_optimizer_shards([s["optimizer"] for s in shards]) if shards[0]["optimizer"] else {}
    return weights, optim


def load_full_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The complete model state dict (all experts, i.e. the layout at expert_parallel_size=1)."""
    meta = read_meta(ckpt_dir)
    shared = _load(Path(ckpt_dir) / SHARED_FILE)
    experts, _ = load_full_expert_state(ckpt_dir, meta)
    return {**shared["model"], **experts}


def load_checkpoint(
    ckpt_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    groups: ParallelGroups,
) -> Restored:
    """Restore this rank's state from a checkpoint written at any expert-parallel size.

    RNG states are per rank and only restored when the world size is the same; the data
    reader's position is global, so at another world size rank 0's reader state is used.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    shared = _load(ckpt_dir / SHARED_FILE)
    full_experts, full_expert_optim = load_full_expert_state(ckpt_dir, meta)
    my_experts = shard_experts(full_experts, groups.ep_rank, groups.ep_size)

    model_state = {**shared["model"], **my_experts}
    own = model.state_dict()
    for name, tensor in model_state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(
                f"checkpoint {ckpt_dir}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(own[name].shape)} (different model config?)"
            )
    model.load_state_dict(model_state, strict=True)

    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        expert_optim = _shard_optimizer_state(full_expert_optim, groups.ep_rank, groups.ep_size)
        load_optimizer_state_by_name(optimizer, names, {**shared["optimizer"], **expert_optim})
        if scheduler is not None:
            scheduler.load_state_dict(shared["scheduler"])
            # LambdaLR does not write its last lr back into the optimiser on load.
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    if scaler is not None and shared.get("scaler"):
        scaler.load_state_dict(shared["scaler"])

    reader_state = shared.get("reader")
    own_rank_file = ckpt_dir / rank_file(groups.rank)
    if int(meta["world_size"]) == groups.world_size and own_rank_file.exists():
        per_rank = _load(own_rank_file)
        set_rng_state(per_rank["rng"])
        reader_state = per_rank["reader"]
    return Restored(step=int(meta["step"]), reader_state=reader_state, meta=meta)
