"""FSDP2 (``train.data_parallel=fsdp``) against the DDP path, in real gloo process groups on CPU.

* 20 optimizer steps (2 micro-batches each, so FSDP's no-sync accumulation is used) at world size
  2 with expert parallelism 2 give the DDP path's loss curve and weights within float tolerance;
* world 4, EP 2 (each expert shard FSDP-sharded over 2 replicas, called per chunk) equals DDP;
* a checkpoint written by the FSDP2 run (EP=2) loads into an FSDP2 model at EP=1 (experts now
  sharded over a replica group of 2) with the same global weights, and both layouts then take
  the same next step.
"""

from __future__ import annotations

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
    shared_expert=True,
    aux_loss_coef=0.01,
)
STEPS = 20


def _parts(groups, mode: str):
    from components.model.transformer import Transformer
    from components.training.optim import build_optimizer, build_scheduler
    from components.training.parallel import wrap_ddp, wrap_fsdp
    from components.training.step import StepParts, build_balancer

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = Transformer(
        ModelConfig(**MODEL), VOCAB, ep_group=groups.ep_group, overlap=OverlapConfig(a2a_chunks=2)
    )
    if mode == "fsdp":
        wrap_fsdp(model, groups, cpu, None)
    train = TrainConfig(lr=1e-2, weight_decay=0.1, max_steps=STEPS + 2, warmup_steps=2)
    optimizer = build_optimizer(model, train)
    return StepParts(
        model=model,
        wrapped=model if mode == "fsdp" else wrap_ddp(model, groups, cpu, 1),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, train),
        groups=groups,
        grad_clip=1.0,
        balancer=build_balancer(model, optimizer),
    )


def _batches(rank: int, steps: int) -> list[list[torch.Tensor]]:
    """Two steps' worth of random sequences, repeated: a model can only lower its loss on random
    tokens by memorising them."""
    gen = torch.Generator().manual_seed(100 + rank)
    data = [[torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(2)] for _ in range(2)]
    return [data[step % 2] for step in range(steps)]


def _full_state(model) -> dict[str, torch.Tensor]:
    from components.training.optim import gathered

    # clone: on CPU the host copy of a plain tensor is the live parameter itself
    return {k: gathered(v, True).clone() for k, v in model.state_dict().items()}


def _train(parts, rank: int, steps: int) -> list[float]:
    from components.training.metrics import IntervalMetrics
    from components.training.step import train_step

    losses = []
    for micro in _batches(rank, steps):
        metrics = IntervalMetrics(torch.device("cpu"))
        assert train_step(parts, iter(micro), 2, metrics)
        losses.append(metrics.read(parts.groups)[0]["loss"])
    return losses


def _body(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from components.training import checkpoint as ckpt
    from components.training.parallel import build_groups, is_fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out: dict = {}
        groups = build_groups(2)
        for mode in ("ddp", "fsdp"):
            parts = _parts(groups, mode)
            assert is_fsdp(parts.model) == (mode == "fsdp")
            out[f"{mode}_losses"] = _train(parts, rank, STEPS)
            out[f"{mode}_state"] = _full_state(parts.model)
        # the FSDP2 run's checkpoint, resharded to EP=1 (experts sharded over 2 replicas by FSDP)
        ckpt.save_checkpoint(
            out_dir + "/ckpt",
            model=parts.model,
            optimizer=parts.optimizer,
            scheduler=parts.scheduler,
            scaler=None,
            groups=groups,
            step=STEPS,
            reader_state={},
            meta={},
        )
        dist.barrier()
        groups1 = build_groups(1)
        for mode in ("ddp", "fsdp"):
            resumed = _parts(groups1, mode)
            restored = ckpt.load_checkpoint(
                out_dir + "/ckpt",
                model=resumed.model,
                optimizer=resumed.optimizer,
                scheduler=resumed.scheduler,
                scaler=None,
                groups=groups1,
            )
            assert restored.step == STEPS
            out[f"resumed_{mode}_state"] = _full_state(resumed.model)
            out[f"resumed_{mode}_losses"] = _train(resumed, rank, 2)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_with_expert_parallelism_follows_the_ddp_loss_curve_and_reshards(tmp_path):
    world = 2
    mp.spawn(_body, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    out = torch.load(tmp_path / "rank0.pt", weights_only=False)
    ddp, fsdp = out["ddp_losses"], out["fsdp_losses"]
    assert len(ddp) == len(fsdp) == STEPS
    assert ddp[-1] < ddp[0] - 0.2, ddp  # it learns
    for step, (a, b) in enumerate(zip(ddp, fsdp)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    # rank 0 holds expert shard 0 in both runs: compare every weight
    for name, value in out["ddp_state"].items():
        other = out["fsdp_state"][name]
        assert torch.allclose(value, other, atol=2e-5, rtol=1e-4), (
            name,
            (value - other).abs().max(),
        )
    # the EP=1 model restored from the EP=2 checkpoint holds the global weights (experts 0..3)
    resumed = out["resumed_fsdp_state"]
    experts_ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name, value in resumed.items():
        if ".moe.experts." in name:
            expected = torch.cat([r["fsdp_state"][name] for r in experts_ranks])
        else:
            expected = out["fsdp_state"][name]
        assert torch.equal(value, expected), name
        assert torch.equal(out["resumed_ddp_state"][name], value), name
    # and the two layouts take the same steps from there
    for a, b in zip(out["resumed_ddp_losses"], out["resumed_fsdp_losses"]):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def _replicas_body(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from components.training.parallel import build_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        groups = build_groups(2)  # world 4: each expert shard on 2 replicas
        out = {}
        for mode in ("ddp", "fsdp"):
            parts = _parts(groups, mode)
            out[f"{mode}_losses"] = _train(parts, rank, 6)
            out[f"{mode}_state"] = _full_state(parts.model)
        torch.save(out, f"{out_dir}/replicas{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_experts_sharded_over_their_replicas_follow_ddp(tmp_path):
    """World 4, EP 2: FSDP2 shards each expert shard over its 2 replicas, and the dispatcher calls
    the experts once per all-to-all chunk (2): the reduce-scatter must still see the whole
    gradient, summed over replicas and divided by W (on gloo, with sum-then-divide)."""
    world = 4
    mp.spawn(
        _replicas_body, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True
    )
    for rank in range(world):
        out = torch.load(tmp_path / f"replicas{rank}.pt", weights_only=False)
        for a, b in zip(out["ddp_losses"], out["fsdp_losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (rank, a, b)
        for name, value in out["ddp_state"].items():
            other = out["fsdp_state"][name]
            assert torch.allclose(value, other, atol=5e-6, rtol=1e-5), (rank, name)
