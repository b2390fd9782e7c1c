"""Gradient synchronisation: EP=2 (experts sharded, EDP groups of 1) gives exactly the gradients
of EP=1 (experts replicated, averaged over both ranks), for dense and expert parameters alike.

Two gloo processes on this machine (torch.multiprocessing), no Ray.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from components.config.schema import ModelConfig, OverlapConfig

CFG = dict(
    dim=32, n_heads=2, n_layers=2, ffn_dim=48, num_experts=4, top_k=2, max_seq_len=32, dropless=True
)
VOCAB = 64


def _synced_grads(ep_size: int, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """Full gradients (all experts) after DDP + expert sync, and the clipped-by norm."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from components.model.transformer import Transformer
    from components.training.parallel import (
        build_groups,
        clip_grad_norm,
        split_params,
        sync_expert_grads,
        wrap_ddp,
    )

    groups = build_groups(ep_size)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(**CFG), VOCAB, ep_group=groups.ep_group, overlap=OverlapConfig(a2a_chunks=1)
    )
    ddp = wrap_ddp(model, groups, torch.device("cpu"), bucket_mb=1)
    batch = torch.randint(
        0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(rank)
    )  # each rank its own data
    logits, aux = ddp(batch[:, :-1])
    loss = (
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        + aux["aux_loss"]
        + aux["z_loss"]
    )
    loss.backward()
    dense, experts = split_params(model)
    sync_expert_grads(experts, groups)
    norm = float(clip_grad_norm(dense, experts, 0.0, groups))  # max_norm 0: measure only
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if getattr(p, "_moeops_expert", False) and groups.ep_group is not None:
            parts = [torch.empty_like(grad) for _ in range(groups.ep_size)]
            dist.all_gather(parts, grad.contiguous(), group=groups.ep_group)
            grad = torch.cat(parts)
        grads[name] = grad
    return grads, norm


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {ep: _synced_grads(ep, rank) for ep in (1, 2)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ep2_gradients_equal_ep1_gradients(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        (grads1, norm1), (grads2, norm2) = ranks[r][1], ranks[r][2]
        assert grads1.keys() == grads2.keys()
        assert any(".moe.experts." in k for k in grads1)
        for name in grads1:
            assert torch.allclose(grads1[name], grads2[name], atol=1e-6, rtol=1e-4), (r, name)
            # and every rank ends with the same (synchronised) gradient
            assert torch.allclose(grads2[name], ranks[0][2][0][name], atol=1e-7), (r, name)
        assert abs(norm1 - norm2) < 1e-5 * max(norm1, 1.0) and norm1 > 0


def test_a_non_finite_global_norm_scales_no_gradient():
    """An inf anywhere makes the norm inf; clipping must then leave the other gradients alone
    (max_norm / inf = 0 would zero them, and 0 * inf would turn the inf into NaN)."""
    from torch import nn

    from components.training.parallel import ParallelGroups, clip_grad_norm

    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])
    b.grad = torch.tensor([float("inf"), 1.0])
    norm = clip_grad_norm([a], [b], 1.0, ParallelGroups(0, 1, 1, 0, None, 1, None, (0,)))
    assert torch.isinf(norm)
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0, 0.0]))
    assert b.grad[1] == 1.0 and torch.isinf(b.grad[0])
    b.grad = torch.tensor([0.0, 0.0])
    norm = clip_grad_norm([a], [b], 1.0, ParallelGroups(0, 1, 1, 0, None, 1, None, (0,)))
    assert float(norm) == 5.0 and torch.allclose(a.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
