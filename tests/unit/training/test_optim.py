"""AdamW parameter groups, the warmup + cosine schedule and name-keyed optimiser state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.config import load_config
from components.training.optim import (
    build_optimizer,
    build_scheduler,
    load_optimizer_state_by_name,
    lr_factor,
    optimizer_state_by_name,
    param_groups,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.proj(self.embed(x))).sum()


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.embed.weight),
        id(model.proj.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }


def test_warmup_then_cosine_to_min_ratio():
    warmup, total, floor = 10, 110, 0.1
    factors = [lr_factor(s, warmup, total, floor) for s in range(total + 5)]
    assert factors[0] == pytest.approx(0.1)  # 1/warmup
    assert factors[warmup - 1] == pytest.approx(1.0)  # end of warmup: the peak
    assert factors[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))  # monotone decay
    assert factors[total] == pytest.approx(floor) and factors[-1] == pytest.approx(floor)
    assert factors[warmup + 50] == pytest.approx(
        floor + (1 - floor) * 0.5
    )  # half way: cosine midpoint


def test_scheduler_follows_config_and_state_roundtrips_by_name():
    cfg = load_config(["train.lr=0.01", "train.warmup_steps=2", "train.max_steps=10"]).train
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # warmup step 0: lr / 2
    for _ in range(3):
        model(torch.arange(5)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    names = {id(p): n for n, p in model.named_parameters()}
    saved = optimizer_state_by_name(opt, names)
    assert set(saved) == set(names.values())
    assert torch.equal(saved["proj.weight"]["exp_avg"], opt.state[model.proj.weight]["exp_avg"])

    fresh = Tiny()
    fresh.load_state_dict(model.state_dict())
    opt2 = build_optimizer(fresh, cfg)
    load_optimizer_state_by_name(opt2, {id(p): n for n, p in fresh.named_parameters()}, saved)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"])

    bad = {"proj.weight": {**saved["proj.weight"], "exp_avg": torch.zeros(3)}}
    with pytest.raises(ValueError, match="proj.weight.exp_avg"):
        load_optimizer_state_by_name(opt2, {id(p): n for n, p in fresh.named_parameters()}, bad)


def test_router_lr_scale_gives_the_routers_their_own_scheduled_lr():
    from components.model.transformer import Transformer

    base = ["model.dim=16", "model.n_heads=2", "model.ffn_dim=8", "train.lr=0.01"]
    cfg = load_config([*base, "train.router_lr_scale=4", "train.warmup_steps=2"])
    model = Transformer(cfg.model, 32)
    optimizer = build_optimizer(model, cfg.train)
    routers = [p for n, p in model.named_parameters() if n.endswith("router.gate.weight")]
    assert len(routers) == cfg.model.n_layers
    *_, router_group = optimizer.param_groups
    assert [id(p) for p in router_group["params"]] == [id(p) for p in routers]
    assert router_group["lr"] == pytest.approx(0.04) and router_group["weight_decay"] == 0.1
    others = {id(p) for g in optimizer.param_groups[:-1] for p in g["params"]}
    assert others.isdisjoint(id(p) for p in routers)
    scheduler = build_scheduler(optimizer, cfg.train)  # warmup step 0: 1/2 of every group's lr
    assert router_group["lr"] == pytest.approx(0.02)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    del scheduler
    # at the default scale the groups are exactly the two of a model without the option
    plain = build_optimizer(model, load_config(base).train)
    assert len(plain.param_groups) == 2


def test_expert_lr_scale_gives_the_routed_experts_their_own_lr():
    from components.model.transformer import Transformer

    base = ["model.dim=16", "model.n_heads=2", "model.ffn_dim=8", "train.lr=0.01"]
    cfg = load_config([*base, "train.expert_lr_scale=2", "train.router_lr_scale=4"])
    model = Transformer(cfg.model, 32)
    optimizer = build_optimizer(model, cfg.train)
    experts = [p for n, p in model.named_parameters() if ".moe.experts." in n]
    assert len(experts) == 3 * cfg.model.n_layers  # w1, w3, w2 of every MoE layer
    *_, router_group, expert_group = optimizer.param_groups
    assert [id(p) for p in expert_group["params"]] == [id(p) for p in experts]
    assert expert_group["lr"] == pytest.approx(0.02) and expert_group["weight_decay"] == 0.1
    assert router_group["lr"] == pytest.approx(0.04)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    with pytest.raises(Exception, match=r"train.expert_lr_scale=-1.0: must be > 0"):
        load_config(["train.expert_lr_scale=-1"])


def test_router_options_are_validated_and_scale_the_router_init():
    from components.config.validate import ConfigError
    from components.model.transformer import Transformer

    with pytest.raises(ConfigError, match=r"train.router_lr_scale=0.0: must be > 0"):
        load_config(["train.router_lr_scale=0"])
    with pytest.raises(ConfigError, match=r"model.router_init_scale=0.0: must be > 0"):
        load_config(["model.router_init_scale=0"])
    base = ["model.dim=64", "model.n_heads=2", "model.num_experts=64"]
    stds = []
    for scale in ("1", "0.1"):
        torch.manual_seed(0)
        model = Transformer(load_config([*base, f"model.router_init_scale={scale}"]).model, 32)
        stds.append(model.layers[0].moe.router.gate.weight.std().item())
    assert stds[0] == pytest.approx(0.02, rel=0.1) and stds[1] == pytest.approx(0.002, rel=0.1)
