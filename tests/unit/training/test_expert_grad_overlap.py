"""Expert gradients all-reduced during backward (``ExpertGradReducer``), in real gloo groups.

World 4, expert parallelism 2 (expert replicas {0, 2} and {1, 3}), two optimizer steps of two
micro-batches: the weights equal those of the after-backward all-reduce
(``sync_expert_grads``), and every bucket was started by a gradient hook during the last
micro-batch's backward (none during the first: accumulation does not synchronise).
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from components.config.schema import ModelConfig, OverlapConfig, TrainConfig

VOCAB = 64
MODEL = ModelConfig(
    dim=32,
    n_heads=2,
    n_layers=2,
    ffn_dim=48,
    num_experts=4,
    top_k=2,
    max_seq_len=32,
    dropless=True,
    shared_expert=True,
)


def _body(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from components.model.transformer import Transformer
    from components.training.metrics import IntervalMetrics
    from components.training.optim import build_optimizer
    from components.training.parallel import ExpertGradReducer, build_groups, wrap_ddp
    from components.training.step import StepParts, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        groups = build_groups(2)
        gen = torch.Generator().manual_seed(100 + rank)
        data = [torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(4)]
        out = {}
        for overlapped in (False, True):
            torch.manual_seed(0)
            model = Transformer(MODEL, VOCAB, ep_group=groups.ep_group, overlap=OverlapConfig())
            optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
            parts = StepParts(
                model=model,
                wrapped=wrap_ddp(model, groups, torch.device("cpu"), 1),
                optimizer=optimizer,
                scheduler=None,
                groups=groups,
                grad_clip=1.0,
            )
            if overlapped:  # a bucket per parameter: each is launched by its own hook
                parts.expert_reducer = ExpertGradReducer(parts.expert_params, groups, 1e-6)
            for step in range(2):
                assert train_step(
                    parts,
                    iter(data[2 * step : 2 * step + 2]),
                    2,
                    IntervalMetrics(torch.device("cpu")),
                )
            out[overlapped] = {n: p.detach().clone() for n, p in model.named_parameters()}
            if overlapped:
                out["launched"] = parts.expert_reducer.launched_in_backward
                out["buckets"] = len(parts.expert_reducer.buckets)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_expert_grads_reduced_during_backward_equal_the_after_backward_reduction(tmp_path):
    world = 4
    mp.spawn(_body, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert out["buckets"] == 6  # 2 MoE layers x (w1, w3, w2)
        assert out["launched"] == 2 * out["buckets"]  # every bucket, on both steps, in backward
        for name, value in out[False].items():
            assert torch.allclose(out[True][name], value, atol=1e-6, rtol=1e-5), name
