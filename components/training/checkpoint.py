"""Training checkpoints that survive a change of expert-parallel size.

Layout of one checkpoint directory (Ray Train merges the files every rank reports into it):

    meta.json                       step, world/expert-parallel sizes, model config (rank 0)
    shared.pt                       non-expert weights + their optimiser state, scheduler,
                                    grad scaler (rank 0; identical on every rank)
    experts-<i>-of-<E>.pt           expert shard i of E: expert weights [E/EP, ...] and their
                                    optimiser moments, keyed by parameter name (first replica only)
    rank-<r>.pt                     RNG states and data-reader position of rank r
    flow_report.json                data-flow report of all ranks, every step so far (rank 0)

Expert tensors are stacked ``[num_local_experts, ...]`` with experts sharded contiguously, so
a full tensor is the concatenation of the shards along dim 0 in shard order, and a new shard
is a contiguous slice of it (``components.model.export.merge_expert_shards`` /
``shard_experts``).

Loading scales with the model, not with the number of ranks: at an unchanged EP size a rank
reads its own expert file and nothing else; at another EP size it memory-maps only the old
shards that overlap its new block of experts and copies out just those rows. Every file is
read with ``torch.load(weights_only=True)``: the RNG states are stored as tensors and plain
Python values (numpy's state is converted), so nothing needs the unsafe unpickler.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.model.export import merge_expert_shards
from components.training.optim import (
    gathered,
    like_param,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from components.training.parallel import ParallelGroups, expert_param_names, reshard

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
    reader_state: dict | None  # this rank's reader state (rank 0's when the world size changed)
    meta: dict
    files_read: list[str] = field(default_factory=list)  # checkpoint files this rank opened


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """torch, CUDA, Python and numpy RNG states as tensors and plain values
    (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
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
        full = (
            merge_expert_shards(per_shard)
            if _is_moment(next(iter(per_shard[0].values())))
            else per_shard[0]
        )
        for name, value in full.items():
            merged[name][key] = value
    return merged


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
    """Write this rank's part of the checkpoint of ``step`` into ``out_dir`` (``model``
    unwrapped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reshard(model)  # FSDP2 after an evaluation forward: the optimizer's parameters back in place
    expert_names = set(expert_param_names(model))
    names = {id(p): n for n, p in model.named_parameters()}

    # Only the ranks that write a tensor copy it to the host: rank 0 the shared state, the first
    # replica of each expert shard its experts. FSDP2-sharded tensors are gathered on every rank
    # of their mesh first (a collective; the same order everywhere).
    def writes(name: str) -> bool:
        return groups.rank < groups.ep_size if name in expert_names else groups.rank == 0

    model_state = {
        k: v
        for k, v in ((k, gathered(v, writes(k))) for k, v in model.state_dict().items())
        if v is not None
    }
    optim_state = optimizer_state_by_name(optimizer, names, keep=writes)

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
    torch.save(
        {"rng": rng_state(), "reader": reader_state, "step": step}, out / rank_file(groups.rank)
    )
    return out


# ------------------------------------------------------------------------ load


def read_flow_report(ckpt_dir: str | Path) -> list[dict] | None:
    """The checkpoint's data-flow report (``components.data.flow``), or None if it has none."""
    path = Path(ckpt_dir) / FLOW_REPORT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a moeops training checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def _load(path: Path) -> Any:
    """A checkpoint file, memory-mapped: tensors are read from disk only where they are used."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_full_expert_state(ckpt_dir: str | Path, meta: dict | None = None) -> tuple[dict, dict]:
    """All expert shards merged: (expert weights [num_experts, ...], their optimiser state)."""
    ckpt_dir = Path(ckpt_dir)
    meta = meta or read_meta(ckpt_dir)
    ep_size = int(meta["expert_parallel_size"])
    shards = [_load(ckpt_dir / expert_file(i, ep_size)) for i in range(ep_size)]
    weights = merge_expert_shards([s["model"] for s in shards]) if shards[0]["model"] else {}
    optim = (
        _merge_optimizer_shards([s["optimizer"] for s in shards]) if shards[0]["optimizer"] else {}
    )
    return weights, optim


def load_full_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The complete model state dict (all experts, i.e. the layout at expert_parallel_size=1)."""
    meta = read_meta(ckpt_dir)
    shared = _load(Path(ckpt_dir) / SHARED_FILE)
    experts, _ = load_full_expert_state(ckpt_dir, meta)
    return {**shared["model"], **experts}


def _slice_rows(state: dict, lo: int, hi: int) -> dict:
    return {name: tensor[lo:hi] for name, tensor in state.items()}


def _slice_optimizer_rows(state: dict[str, dict], lo: int, hi: int) -> dict[str, dict]:
    return {
        name: {
            key: (value[lo:hi] if _is_moment(value) else value) for key, value in moments.items()
        }
        for name, moments in state.items()
    }


def read_expert_block(
    ckpt_dir: Path, saved_ep_size: int, num_experts: int, ep_rank: int, ep_size: int
) -> tuple[dict, dict, list[str]]:
    """This rank's experts ``[ep_rank * n, (ep_rank + 1) * n)`` (``n = num_experts / ep_size``) from
    a checkpoint written at ``saved_ep_size``: (weights, optimiser state, files read).

    Same EP size: exactly the rank's own file. Otherwise only the saved shards overlapping the
    block, memory-mapped, with just the overlapping rows copied out."""
    if saved_ep_size == ep_size:
        name = expert_file(ep_rank, ep_size)
        shard = _load(ckpt_dir / name)
        return shard["model"], shard["optimizer"], [name]
    if num_experts % saved_ep_size or num_experts % ep_size:
        raise ValueError(
            f"checkpoint {ckpt_dir}: {num_experts} experts cannot be split over expert-parallel "
            f"sizes {saved_ep_size} (saved) and {ep_size} (now)"
        )
    per_saved, per_new = num_experts // saved_ep_size, num_experts // ep_size
    lo, hi = ep_rank * per_new, (ep_rank + 1) * per_new
    weights, optim, names = [], [], []
    for i in range(lo // per_saved, (hi - 1) // per_saved + 1):
        name = expert_file(i, saved_ep_size)
        shard = _load(ckpt_dir / name)
        a, b = max(lo, i * per_saved) - i * per_saved, min(hi, (i + 1) * per_saved) - i * per_saved
        weights.append(_slice_rows(shard["model"], a, b))
        optim.append(_slice_optimizer_rows(shard["optimizer"], a, b))
        names.append(name)
    merged_weights = merge_expert_shards(weights) if weights[0] else {}
    merged_optim = _merge_optimizer_shards(optim) if optim[0] else {}
    return merged_weights, merged_optim, names


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
    files_read = [SHARED_FILE]
    expert_names = expert_param_names(model)
    my_experts: dict = {}
    my_expert_optim: dict = {}
    if expert_names:
        num_experts = model.get_parameter(expert_names[0]).shape[0] * groups.ep_size
        my_experts, my_expert_optim, shard_files = read_expert_block(
            ckpt_dir, int(meta["expert_parallel_size"]), num_experts, groups.ep_rank, groups.ep_size
        )
        files_read += shard_files

    model_state = {**shared["model"], **my_experts}
    own = model.state_dict()
    for name, tensor in model_state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(
                f"checkpoint {ckpt_dir}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(own[name].shape)} (different model config?)"
            )
    model.load_state_dict(
        {name: like_param(tensor, own[name]) for name, tensor in model_state.items()}, strict=True
    )

    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        load_optimizer_state_by_name(optimizer, names, {**shared["optimizer"], **my_expert_optim})
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
        files_read.append(own_rank_file.name)
        set_rng_state(per_rank["rng"])
        reader_state = per_rank["reader"]
    return Restored(
        step=int(meta["step"]), reader_state=reader_state, meta=meta, files_read=files_read
    )
