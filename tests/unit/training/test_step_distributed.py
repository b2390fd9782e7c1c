"""One optimizer step under expert parallelism, in real gloo process groups (torch.multiprocessing,
no Ray).

* fp16: an inf that the test puts into one rank's expert gradient makes *every* rank skip the
  step (weights, optimiser state, router bias untouched, same loss scale everywhere), and the next
  step leaves all replicas identical;
* gradient accumulation: ``grad_accum_steps=2`` at batch b gives the weights of
  ``grad_accum_steps=1`` at batch 2b, and the router bias moves once per optimizer step.

fp16 runs under CPU autocast with a CPU ``ShardedGradScaler`` here; on a GPU the same code runs
with CUDA autocast and NCCL (only the device differs).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from components.config.schema import ModelConfig, OverlapConfig, TrainConfig

VOCAB = 64
MODEL = dict(
    dim=32,
    n_heads=2,
    n_layers=2,
    ffn_dim=48,
    num_experts=4,
    top_k=2,
    max_seq_len=32,
    dropless=True,
    bias_balancing=True,
    bias_update_rate=0.01,
    aux_loss_coef=0.0,
)
RATE = MODEL["bias_update_rate"]


def _parts(groups, precision: str, model_cfg: dict, sgd: bool = False):
    from components.model.transformer import Transformer
    from components.training.optim import build_optimizer
    from components.training.parallel import wrap_ddp
    from components.training.precision import autocast_for, grad_scaler_for
    from components.training.step import StepParts, build_balancer

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = Transformer(
        ModelConfig(**model_cfg),
        VOCAB,
        ep_group=groups.ep_group,
        overlap=OverlapConfig(a2a_chunks=2),
    )
    # SGD where gradients are compared through the weights: Adam divides by sqrt(v), which turns
    # float-rounding differences of near-zero gradient entries into full-size steps
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.5)
        if sgd
        else build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    )
    return StepParts(
        model=model,
        wrapped=wrap_ddp(model, groups, cpu, 1),
        optimizer=optimizer,
        scheduler=None,
        groups=groups,
        grad_clip=1.0,
        autocast=lambda: autocast_for(precision, cpu),
        scaler=grad_scaler_for(precision, cpu, groups),
        balancer=build_balancer(model, optimizer),
    )


def _batches(rank: int, count: int, batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, VOCAB, (batch, 17), generator=gen) for _ in range(count)]


def _snapshot(parts) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in parts.model.named_parameters()},
        "bias": [layer.router.expert_bias.clone() for layer in parts.model.moe_layers()],
        "optimizer_steps": sum(1 for p in parts.model.parameters() if p in parts.optimizer.state),
        "scaler": dict(parts.scaler.state_dict()) if parts.scaler is not None else None,
    }


def _run(rank: int, world: int, init_file: str, out_dir: str, body) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(body(rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- fp16


def _fp16_body(rank: int) -> dict:
    from components.training.metrics import IntervalMetrics
    from components.training.parallel import build_groups
    from components.training.step import train_step

    groups = build_groups(2)  # world 4: EP groups {0,1}, {2,3}; expert replicas {0,2}, {1,3}
    parts = _parts(groups, "fp16", MODEL)
    metrics = IntervalMetrics(torch.device("cpu"))
    out = {"before": _snapshot(parts)}
    hook = None
    if rank == 0:  # the fault: an overflow in this rank's expert gradient only

        def poison(grad):
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad

        hook = parts.model.layers[0].moe.experts.w1.register_hook(poison)
    out["stepped_1"] = train_step(parts, iter(_batches(rank, 1, 2)), 1, metrics)
    out["after_skip"] = _snapshot(parts)
    if hook is not None:
        hook.remove()
    out["stepped_2"] = train_step(parts, iter(_batches(rank, 1, 2)), 1, metrics)
    out["after_step"] = _snapshot(parts)
    out["ep_rank"] = groups.ep_rank
    return out


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    world = 4
    mp.spawn(
        _run,
        args=(world, str(tmp_path / "init"), str(tmp_path), _fp16_body),
        nprocs=world,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, out in enumerate(ranks):
        assert out["stepped_1"] is False, f"rank {r} stepped on another rank's overflow"
        before, skipped = out["before"], out["after_skip"]
        for name, value in before["params"].items():
            assert torch.equal(skipped["params"][name], value), (r, name)
        assert skipped["optimizer_steps"] == 0  # AdamW never ran: no moments
        assert all(
            torch.equal(a, b) for a, b in zip(skipped["bias"], before["bias"])
        )  # the bias did not move
        assert skipped["scaler"]["scale"] == before["scaler"]["scale"] / 2  # backed off...
        assert skipped["scaler"] == ranks[0]["after_skip"]["scaler"]  # ...identically everywhere

        assert out["stepped_2"] is True
        stepped = out["after_step"]
        assert stepped["scaler"] == ranks[0]["after_step"]["scaler"]
        assert any(
            not torch.equal(stepped["params"][n], before["params"][n]) for n in before["params"]
        )
        assert any(not torch.equal(a, b) for a, b in zip(stepped["bias"], before["bias"]))
    # every replica holds the same weights: non-expert ones on all ranks, each expert shard on its
    # replicas
    for r, out in enumerate(ranks):
        for name, value in out["after_step"]["params"].items():
            twin = 0 if ".moe.experts." not in name else out["ep_rank"]
            assert torch.equal(value, ranks[twin]["after_step"]["params"][name]), (r, name)
        for a, b in zip(out["after_step"]["bias"], ranks[0]["after_step"]["bias"]):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------- accumulation


def _accumulation_body(rank: int) -> dict:
    from components.training.metrics import IntervalMetrics
    from components.training.parallel import build_groups
    from components.training.step import train_step

    groups = build_groups(2)
    results = {}
    for accum, _batch in ((2, 2), (1, 4)):
        parts = _parts(groups, "fp32", MODEL, sgd=True)
        metrics = IntervalMetrics(torch.device("cpu"))
        biases = [_snapshot(parts)["bias"]]
        micro = _batches(rank, 4, 2)  # the same 8 sequences per rank either way
        for step in range(2):
            mine = micro[2 * step : 2 * step + 2]
            feed = mine if accum == 2 else [torch.cat(mine)]
            assert train_step(parts, iter(feed), accum, metrics)
            biases.append(_snapshot(parts)["bias"])
        results[accum] = {
            "params": _snapshot(parts)["params"],
            "biases": biases,
            "bias_updates": parts.balancer.updates,
            "metrics": metrics.read(groups)[0],
        }
    return results


def test_grad_accumulation_equals_the_larger_batch_and_moves_the_bias_once_per_step(tmp_path):
    world = 2
    mp.spawn(
        _run,
        args=(world, str(tmp_path / "init"), str(tmp_path), _accumulation_body),
        nprocs=world,
        join=True,
    )
    for r in range(world):
        out = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        accumulated, single = out[2], out[1]
        for name, value in single["params"].items():
            assert torch.allclose(accumulated["params"][name], value, atol=1e-6, rtol=1e-5), (
                r,
                name,
                (accumulated["params"][name] - value).abs().max(),
            )
        for key in ("loss", "grad_norm"):
            assert accumulated["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), (
                key
            )
        for run in (accumulated, single):
            assert run["bias_updates"] == 2  # two optimizer steps, however many micro-batches
            for before, after in zip(run["biases"], run["biases"][1:]):
                for b0, b1 in zip(before, after):
                    step = (b1 - b0).abs()
                    # one sign update: every expert moved by exactly 0 or one rate, never k rates
                    assert torch.all((step < 1e-9) | ((step - RATE).abs() < 1e-7)), step
                    assert step.max() > 0
        for b_acc, b_one in zip(accumulated["biases"][-1], single["biases"][-1]):
            assert torch.equal(b_acc, b_one)
