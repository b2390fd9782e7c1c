"""Checkpoints: per-rank expert shards + shared state, restored at another expert-parallel size."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from components.config import load_config
from components.model.experts import mark_expert
from components.training import checkpoint as ckpt
from components.training.optim import build_optimizer, build_scheduler
from components.training.parallel import ParallelGroups

NUM_EXPERTS = 4


class ToyExperts(nn.Module):
    def __init__(self, num_local: int):
        super().__init__()
        self.w1 = mark_expert(nn.Parameter(torch.randn(num_local, 3, 2)))


class ToyMoE(nn.Module):
    def __init__(self, num_local: int):
        super().__init__()
        self.router = nn.Linear(3, NUM_EXPERTS, bias=False)
        self.experts = ToyExperts(num_local)


class ToyBlock(nn.Module):
    def __init__(self, num_local: int):
        super().__init__()
        self.moe = ToyMoE(num_local)


class ToyModel(nn.Module):
    """Parameter names like the real Transformer's: layers.<i>.moe.experts.<w> are expert shards."""

    def __init__(self, ep_size: int = 1):
        super().__init__()
        self.layers = nn.ModuleList([ToyBlock(NUM_EXPERTS // ep_size)])
        self.norm = nn.LayerNorm(3)

    def loss(self, ep_rank: int = 0) -> torch.Tensor:
        w = self.layers[0].moe.experts.w1
        offset = ep_rank * w.shape[0]
        scale = torch.arange(offset, offset + w.shape[0], dtype=torch.float32).view(-1, 1, 1) + 1
        return (
            (w * scale).pow(2).sum()
            + self.layers[0].moe.router.weight.sum()
            + self.norm.weight.sum()
        )


def groups(rank: int, world: int, ep: int) -> ParallelGroups:
    return ParallelGroups(
        rank, world, ep, rank % ep, None, world // ep, None, tuple(range(rank % ep, world, ep))
    )


def trained(model: ToyModel, cfg, ep_rank: int = 0, steps: int = 2):
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(steps):
        model.loss(ep_rank).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt, sched


@pytest.fixture
def train_cfg():
    return load_config(["train.warmup_steps=1", "train.max_steps=10", "train.lr=0.01"]).train


def test_ep2_checkpoint_loads_at_ep1_and_back(tmp_path, train_cfg):
    torch.manual_seed(0)
    full = ToyModel(ep_size=1)
    full_opt, _ = trained(full, train_cfg)

    # Two expert-parallel ranks holding contiguous halves of the same trained state.
    for rank in range(2):
        shard_model = ToyModel(ep_size=2)
        shard_model.load_state_dict(_slice(full_initial_state(), rank))
        opt, sched = trained(shard_model, train_cfg, ep_rank=rank)
        ckpt.save_checkpoint(
            tmp_path,
            model=shard_model,
            optimizer=opt,
            scheduler=sched,
            scaler=None,
            groups=groups(rank, 2, 2),
            step=2,
            reader_state={"rank": rank},
            meta={"note": "t"},
        )

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "experts-000-of-002.pt",
        "experts-001-of-002.pt",
        "meta.json",
        "rank-00000.pt",
        "rank-00001.pt",
        "shared.pt",
    ]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["step"] == 2 and meta["expert_parallel_size"] == 2 and meta["note"] == "t"

    # EP=1 (one rank, all experts): identical weights and Adam moments to the unsharded run.
    torch.manual_seed(1)
    single = ToyModel(ep_size=1)
    single_opt = build_optimizer(single, train_cfg)
    single_sched = build_scheduler(single_opt, train_cfg)
    restored = ckpt.load_checkpoint(
        tmp_path,
        model=single,
        optimizer=single_opt,
        scheduler=single_sched,
        scaler=None,
        groups=groups(0, 1, 1),
    )
    assert restored.step == 2
    assert restored.reader_state == {
        "rank": 0
    }  # world size changed: rank 0's (global) reader position
    for (name, a), b in zip(full.named_parameters(), single.parameters()):
        assert torch.allclose(a, b, atol=1e-7), name
        for key in full_opt.state[a]:
            assert torch.allclose(full_opt.state[a][key], single_opt.state[b][key], atol=1e-9), (
                name,
                key,
            )
        assert full_opt.state[a].keys() == single_opt.state[b].keys()
    assert single_opt.param_groups[0]["lr"] == pytest.approx(single_sched.get_last_lr()[0])
    assert torch.equal(
        ckpt.load_full_model_state(tmp_path)["layers.0.moe.experts.w1"],
        single.layers[0].moe.experts.w1.detach(),
    )

    # Back to EP=2: rank 1 gets experts 2..3, and its own reader position.
    half = ToyModel(ep_size=2)
    half_opt = build_optimizer(half, train_cfg)
    restored = ckpt.load_checkpoint(
        tmp_path,
        model=half,
        optimizer=half_opt,
        scheduler=build_scheduler(half_opt, train_cfg),
        scaler=None,
        groups=groups(1, 2, 2),
    )
    assert restored.reader_state == {"rank": 1}
    assert torch.equal(
        half.layers[0].moe.experts.w1.detach(), full.layers[0].moe.experts.w1.detach()[2:]
    )


_INITIAL: dict = {}


def full_initial_state() -> dict:
    """The state ToyModel(ep_size=1) starts from under seed 0 (what `full` above started from)."""
    if not _INITIAL:
        torch.manual_seed(0)
        _INITIAL.update(ToyModel(ep_size=1).state_dict())
    return _INITIAL


def _slice(state: dict, ep_rank: int) -> dict:
    return {
        k: (v[ep_rank * 2 : (ep_rank + 1) * 2].clone() if ".moe.experts." in k else v.clone())
        for k, v in state.items()
    }


def test_rng_state_is_restored_at_same_world_size(tmp_path, train_cfg):
    model = ToyModel()
    opt, sched = trained(model, train_cfg, steps=1)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    np.random.randn()  # numpy caches the second gaussian of a pair: that is state too
    ckpt.save_checkpoint(
        tmp_path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=None,
        groups=groups(0, 1, 1),
        step=1,
        reader_state={"pos": 7},
        meta={},
    )
    expected = (torch.rand(3), random.random(), np.random.randn(3))
    torch.manual_seed(999)
    random.seed(0)
    np.random.seed(0)
    # weights_only=True: the RNG states are stored as tensors and plain values
    restored = ckpt.load_checkpoint(
        tmp_path,
        model=ToyModel(),
        optimizer=None,
        scheduler=None,
        scaler=None,
        groups=groups(0, 1, 1),
    )
    assert restored.reader_state == {"pos": 7}
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.randn(3), expected[2])


def test_clear_errors_for_wrong_directory_or_model(tmp_path, train_cfg):
    with pytest.raises(FileNotFoundError, match="not a moeops training checkpoint"):
        ckpt.read_meta(tmp_path)
    model = ToyModel()
    opt, sched = trained(model, train_cfg, steps=1)
    ckpt.save_checkpoint(
        tmp_path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=None,
        groups=groups(0, 1, 1),
        step=1,
        reader_state={},
        meta={},
    )
    other = ToyModel()
    other.norm = nn.LayerNorm(5)
    with pytest.raises(ValueError, match="norm.weight has shape"):
        ckpt.load_checkpoint(
            tmp_path,
            model=other,
            optimizer=None,
            scheduler=None,
            scaler=None,
            groups=groups(0, 1, 1),
        )


def _ep2_checkpoint(tmp_path, train_cfg):
    for rank in range(2):
        shard_model = ToyModel(ep_size=2)
        shard_model.load_state_dict(_slice(full_initial_state(), rank))
        opt, sched = trained(shard_model, train_cfg, ep_rank=rank)
        ckpt.save_checkpoint(
            tmp_path,
            model=shard_model,
            optimizer=opt,
            scheduler=sched,
            scaler=None,
            groups=groups(rank, 2, 2),
            step=2,
            reader_state={"rank": rank},
            meta={},
        )


def test_same_ep_size_reads_only_the_ranks_own_shard(tmp_path, train_cfg, monkeypatch):
    _ep2_checkpoint(tmp_path, train_cfg)
    expected = torch.load(tmp_path / "experts-001-of-002.pt", weights_only=True)["model"]
    (tmp_path / "experts-000-of-002.pt").unlink()  # rank 1 must not need rank 0's experts
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))

    model = ToyModel(ep_size=2)
    opt = build_optimizer(model, train_cfg)
    restored = ckpt.load_checkpoint(
        tmp_path,
        model=model,
        optimizer=opt,
        scheduler=build_scheduler(opt, train_cfg),
        scaler=None,
        groups=groups(1, 2, 2),
    )
    assert restored.files_read == ["shared.pt", "experts-001-of-002.pt", "rank-00001.pt"]
    assert torch.equal(model.layers[0].moe.experts.w1.detach(), expected["layers.0.moe.experts.w1"])
    assert loads and all(kw.get("weights_only") is True and kw.get("mmap") is True for kw in loads)
    # at another EP size the missing shard is needed, and the error names it
    with pytest.raises(FileNotFoundError, match="experts-000-of-002.pt"):
        ckpt.load_checkpoint(
            tmp_path,
            model=ToyModel(ep_size=1),
            optimizer=None,
            scheduler=None,
            scaler=None,
            groups=groups(0, 1, 1),
        )


def test_resharding_reads_only_the_overlapping_shards(tmp_path, train_cfg):
    """EP=2 -> EP=4: rank 1 of 4 holds expert 1, which lives in old shard 0 only."""
    _ep2_checkpoint(tmp_path, train_cfg)
    full = ckpt.load_full_model_state(tmp_path)["layers.0.moe.experts.w1"]
    (tmp_path / "experts-001-of-002.pt").unlink()
    model = ToyModel(ep_size=4)
    opt = build_optimizer(model, train_cfg)
    restored = ckpt.load_checkpoint(
        tmp_path, model=model, optimizer=opt, scheduler=None, scaler=None, groups=groups(1, 4, 4)
    )
    assert restored.files_read == [
        "shared.pt",
        "experts-000-of-002.pt",
    ]  # world size changed: no rank file
    w1 = model.layers[0].moe.experts.w1
    assert torch.equal(w1.detach(), full[1:2])
    shard0 = torch.load(tmp_path / "experts-000-of-002.pt", weights_only=True)
    assert torch.equal(
        opt.state[w1]["exp_avg"], shard0["optimizer"]["layers.0.moe.experts.w1"]["exp_avg"][1:2]
    )
