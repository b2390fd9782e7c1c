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
