"""MoE benchmark: layer throughput vs dense and naive, grouped GEMM vs loop, host syncs, and
expert-parallel overlap on vs off.

    python tests/benchmarks/bench_moe.py --json bench-moe.json          # full run (a few minutes)
    python tests/benchmarks/bench_moe.py --quick --json /tmp/quick.json # smoke run (seconds)

Part 1 — one MoE layer, forward + backward, fp32 on CPU (D=256, F=512, 8 experts, top-2, 4096
tokens, dropless; 1 intra-op thread for the headline ratios, 2 threads under ``layer_2threads``)
against
  * a dense SwiGLU MLP with ffn = top_k x F, i.e. the same active FLOPs (the upper limit), and
  * the naive per-expert loop (boolean mask per expert, gather, scatter-add);
  the MoE layer runs with ``expert_backend=auto`` (the loop on CPU) and with ``grouped_mm``.
Host syncs — counted, not assumed: ``components.model.host_sync.HostSyncCounter`` (a
TorchDispatchMode) counts the ops that would make a GPU host wait (``.item()``/``tolist``/
``nonzero``/boolean masks/``bincount``/device->host copies) during one MoE layer forward,
single-rank (loop and grouped_mm) and expert-parallel (overlap on and off).
Part 2 — a 2-worker expert-parallel training step (torch.multiprocessing + gloo on 127.0.0.1,
one thread per worker) with overlap off (synchronous all-to-all, 1 chunk) and on (async
all-to-all, ``--chunks`` chunks). The two settings alternate step by step so machine load
hits both alike. Per step: data wait (building the batch), exposed all-to-all time (the compute
thread blocked in ``work.wait()``, including the count exchange), total all-to-all time (each
collective from launch to completion, stamped by its future's callback), the non-expert
gradient all-reduce (what DDP would do), and compute (the rest).
``exposed_comm_fraction`` = exposed / total all-to-all time with overlap on;
``best_possible_on_vs_off_ratio`` = 1 - (all-to-all share of the step with overlap off): the
step ratio if every all-to-all were hidden.
Part 3 — training memory and compilation on CPU: activation bytes kept per token from forward
to backward (``saved_bytes``: autograd's saved tensors, deduplicated by storage,
parameters excluded) with ``train.activation_checkpointing`` none / selective / full, for a small
MoE model (``activation_bytes_per_token``); ``compile_vs_eager_step_ratio``: a training step with
each block's attention, norms and dense FFN compiled by inductor over the eager step (1 thread).
``python tests/benchmarks/bench_moe.py --model-memory gpu_small`` prints the same activation
figures for an experiment's model at its sequence length under bf16 autocast (per block, and
the rest: embedding, logits, loss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fixtures

from components.config.schema import ModelConfig, OverlapConfig
from components.model.host_sync import HostSyncCounter
from components.model.layers import FeedForward
from components.model.moe import MoELayer
from components.training.parallel import split_params
from fixtures.moe_reference import reference_moe_forward
from pipelines.runtime import free_port

GOALS = {
    "moe_vs_dense_ratio": ">= 0.95 (1 thread)",
    "overlap_on_vs_off_step_ratio": "<= 0.88",
    "exposed_comm_fraction": "<= 0.3",
    "host_syncs_per_moe_layer_forward": "1 (the all-to-all split sizes)",
}


def _median_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------ part 1
def layer_benchmark(quick: bool, threads: int) -> dict:
    D, F, E, k, N = (64, 128, 8, 2, 512) if quick else (256, 512, 8, 2, 4096)
    warmup, iters = (1, 3) if quick else (3, 10)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _layer_benchmark(D, F, E, k, N, warmup, iters)
    finally:
        torch.set_num_threads(previous_threads)


def _moe_layer(D: int, F: int, E: int, k: int, backend: str) -> MoELayer:
    torch.manual_seed(0)
    moe = MoELayer(
        ModelConfig(dim=D, ffn_dim=F, num_experts=E, top_k=k, dropless=True, expert_backend=backend)
    ).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
    return moe


def _layer_benchmark(D: int, F: int, E: int, k: int, N: int, warmup: int, iters: int) -> dict:
    moe = _moe_layer(D, F, E, k, "auto")
    grouped = _moe_layer(D, F, E, k, "grouped_mm")
    torch.manual_seed(0)
    dense = FeedForward(D, k * F)
    x = torch.randn(N, D, requires_grad=True)
    grad = torch.randn(N, D)

    steps = {
        "moe": lambda: moe(x)[0].backward(grad),
        "moe_grouped_mm": lambda: grouped(x)[0].backward(grad),
        "naive": lambda: reference_moe_forward(moe, x).backward(grad),
        "dense": lambda: dense(x).backward(grad),
    }
    # interleave them so load from other processes spreads evenly
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    for _ in range(iters):
        for name, fn in steps.items():
            cpu_start = time.process_time()
            times[name].append(_median_time(fn, 0, 1))
            cpu_times[name].append(time.process_time() - cpu_start)
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    return {
        "shape": {
            "dim": D,
            "ffn_dim": F,
            "num_experts": E,
            "top_k": k,
            "tokens": N,
            "dtype": "fp32",
            "threads": torch.get_num_threads(),
        },
        **{f"{name}_step_s": value for name, value in med.items()},
        **{f"{name}_best_step_s": min(t) for name, t in times.items()},
        **{f"{name}_tokens_per_s": N / value for name, value in med.items()},
        "moe_vs_dense_ratio": med["dense"] / med["moe"],
        # fastest of the interleaved runs: less sensitive to other processes' load than the median
        "moe_vs_dense_ratio_best": min(times["dense"]) / min(times["moe"]),
        # this process' CPU seconds (1 thread: the work done, whatever the wait for a core)
        **{f"{name}_cpu_s": value for name, value in cpu.items()},
        "moe_vs_dense_ratio_cpu_time": cpu["dense"] / cpu["moe"],
        "moe_vs_naive_ratio": med["naive"] / med["moe"],
        "grouped_mm_vs_loop_ratio": med["moe"] / med["moe_grouped_mm"],
    }


def count_layer_host_syncs(layer: MoELayer, x: torch.Tensor) -> dict:
    """Host syncs of one forward of ``layer`` (training mode, with gradients), counted op by op."""
    with HostSyncCounter() as syncs:
        layer(x)
    return {"total": syncs.total, "by_op": dict(syncs.by_op)}


def single_rank_host_syncs(quick: bool) -> dict:
    D, F, E, k, N = (64, 128, 8, 2, 256) if quick else (256, 512, 8, 2, 1024)
    out = {}
    for backend in ("loop", "grouped_mm"):
        layer = _moe_layer(D, F, E, k, backend)
        layer.router.dropless = False  # capacity on: dropping must not add syncs either
        out[backend] = count_layer_host_syncs(layer, torch.randn(N, D))
    return out


# ------------------------------------------------------------------------------ part 2
def _ep_worker(rank: int, world: int, port: int, settings: dict, out_path: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as Fn

    from components.model import Transformer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = ModelConfig(**settings["model"])
    vocab, batch, seq = settings["vocab"], settings["batch"], settings["seq"]
    variants = settings["variants"]
    models, optims = {}, {}
    for name, overlap in variants.items():
        torch.manual_seed(0)
        model = Transformer(
            cfg, vocab, ep_group=dist.group.WORLD, overlap=OverlapConfig(**overlap)
        ).train()
        models[name] = model
        optims[name] = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)
    records = {name: [] for name in variants}

    def step(name: str) -> dict:
        model, optim = models[name], optims[name]
        t0 = time.perf_counter()
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)  # synthetic data
        t_data = time.perf_counter() - t0
        model.comm_times(reset=True)
        logits, aux = model(tokens[:, :-1])
        loss = (
            Fn.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            + aux["aux_loss"]
            + aux["z_loss"]
        )
        loss.backward()
        comm = model.comm_times(reset=True)
        a2a_exposed = comm.exposed_s
        t1 = time.perf_counter()
        grads = [p.grad for p in split_params(model)[0]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # the non-expert (DDP) gradient sync, one bucket
        t_allreduce = time.perf_counter() - t1
        optim.step()
        optim.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        return {
            "step_s": total,
            "data_wait_s": t_data,
            "a2a_exposed_s": a2a_exposed,
            "allreduce_s": t_allreduce,
            "compute_s": total - t_data - a2a_exposed - t_allreduce,
            "a2a_total_s": comm.total_s,
            "a2a_forward_exposed_s": comm.forward_exposed_s,
            "a2a_backward_exposed_s": comm.backward_exposed_s,
        }

    for _ in range(settings["warmup"]):
        for name in variants:
            step(name)
    for _ in range(settings["steps"]):
        for name in variants:
            records[name].append(step(name))
    # means (not medians) so the breakdown adds up to the step time
    summary = {
        name: {key: statistics.fmean(r[key] for r in recs) for key in recs[0]}
        for name, recs in records.items()
    }
    x = torch.randn(batch * seq, cfg.dim)
    for name, model in models.items():
        summary[name]["host_syncs_per_moe_layer_forward"] = count_layer_host_syncs(
            model.moe_layers()[0], x
        )
    gathered = [None] * world
    dist.all_gather_object(gathered, summary)
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def ep_benchmark(quick: bool, chunks: int, shared_expert: bool = False) -> dict:
    """``shared_expert``: the model has one (moe_small's layout), which the overlapped path runs
    in slices behind the count exchange, the first dispatch and the last combine."""
    import torch.multiprocessing as mp

    if quick:
        model = dict(
            dim=64,
            n_heads=4,
            n_layers=2,
            ffn_dim=128,
            num_experts=4,
            top_k=2,
            max_seq_len=64,
            dropless=True,
        )
        settings = dict(model=model, vocab=256, batch=2, seq=32, warmup=1, steps=3)
    else:
        model = dict(
            dim=256,
            n_heads=4,
            n_layers=2,
            ffn_dim=512,
            num_experts=8,
            top_k=2,
            max_seq_len=256,
            dropless=True,
        )
        settings = dict(model=model, vocab=2048, batch=8, seq=256, warmup=2, steps=8)
    model["shared_expert"] = shared_expert
    settings["variants"] = {
        "off": {"async_a2a": False, "a2a_chunks": 1},
        "on": {"async_a2a": True, "a2a_chunks": chunks},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "ep.json")
        mp.spawn(_ep_worker, args=(2, free_port(), settings, out_path), nprocs=2, join=True)
        per_rank = json.loads(Path(out_path).read_text())
    # a synchronous step is bounded by the slower rank: report that rank's breakdown
    merged = {
        name: max((r[name] for r in per_rank), key=lambda fig: fig["step_s"])
        for name in settings["variants"]
    }
    off, on = merged["off"], merged["on"]
    return {
        "setup": {
            "workers": 2,
            "backend": "gloo",
            "threads_per_worker": 1,
            "tokens_per_worker": settings["batch"] * settings["seq"],
            "model": model,
            "vocab": settings["vocab"],
            "steps": settings["steps"],
            "variants": settings["variants"],
        },
        "off": off,
        "on": on,
        "per_rank": per_rank,
        "overlap_on_vs_off_step_ratio": on["step_s"] / off["step_s"],
        "exposed_comm_fraction": on["a2a_exposed_s"] / max(on["a2a_total_s"], 1e-9),
        "exposed_comm_fraction_off": off["a2a_exposed_s"] / max(off["a2a_total_s"], 1e-9),
        "a2a_total_on_vs_off_ratio": on["a2a_total_s"] / max(off["a2a_total_s"], 1e-9),
        "a2a_share_of_step_off": off["a2a_exposed_s"] / off["step_s"],
        # hiding *all* all-to-all time can at best remove its share of the step: the floor of the
        # ratio
        "best_possible_on_vs_off_ratio": 1.0 - off["a2a_exposed_s"] / off["step_s"],
    }


# ----------------------------------------------------------------------------- part 3


def saved_bytes(model, batch: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) the autograd graph keeps from one training forward
    until its backward.

    Activations: every tensor saved for backward (its storage counted once, parameters
    excluded), plus the block inputs an activation-checkpointed region keeps for recomputation.
    Weight copies: saved tensors shaped like a parameter (or one expert's slice of one) in
    another dtype: the bf16 copies autocast makes of fp32 weights; they do not grow with the
    tokens, and FSDP2's
    bf16 parameters replace them. On a GPU the sum is the graph's part of peak memory; CPU has
    no allocator statistics, so it is counted rather than read."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_dtype = next(model.parameters()).dtype
    shapes = set()
    for p in model.parameters():
        for shape in (tuple(p.shape), tuple(p.shape[1:])):
            shapes |= {shape, shape[::-1]}
    activations: dict[int, int] = {}
    weights: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            # a cast copy of a weight: a parameter's shape in another dtype than the parameters'
            copy = tuple(t.shape) in shapes and t.dim() >= 2 and t.dtype != param_dtype
            bucket = weights if copy else activations
            bucket[ptr] = t.untyped_storage().nbytes()

    def pack(t):
        keep(t)
        return t

    hooks = []
    if any(b.checkpointing != "none" for b in model.layers):
        hooks = [b.register_forward_pre_hook(lambda _m, args: keep(args[0])) for b in model.layers]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            logits, aux = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
    finally:
        for h in hooks:
            h.remove()
    del loss, logits, aux
    return sum(activations.values()), sum(weights.values())


def activation_memory(cfg: ModelConfig, vocab: int, batch: int, seq: int, dtype=None) -> dict:
    """Saved activations per token with activation checkpointing none / selective / full."""
    from components.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg, vocab).train()
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    out = {}
    for mode in ("none", "selective", "full"):
        model.configure_training(mode)
        activations, weight_copies = saved_bytes(model, tokens, dtype)
        out[f"{mode}_bytes_per_token"] = activations / (batch * seq)
        out[f"{mode}_weight_copy_bytes"] = weight_copies
    out["selective_vs_none"] = out["selective_bytes_per_token"] / out["none_bytes_per_token"]
    out["full_vs_none"] = out["full_bytes_per_token"] / out["none_bytes_per_token"]
    out.update(model=cfg.name, vocab=vocab, batch=batch, seq=seq, dtype=str(dtype or "fp32"))
    return out


def model_memory(experiment: str, batch: int = 1) -> dict:
    """Activation bytes per token of an experiment's model at its sequence length, bf16 autocast
    (the GPU recipe's dtypes; measured on CPU): a 1-block and a 2-block model of the real
    dimensions give the per-block and the rest (embedding, final norm, logits, loss) figures, and
    ``n_layers`` blocks are extrapolated from them (blocks are identical)."""
    import dataclasses

    from components.config import load_config

    cfg = load_config([f"experiment={experiment}", "paths.root=/tmp/moeops-bench-memory"])
    m, vocab, seq = cfg.model, cfg.data.vocab_size, cfg.data.seq_len
    per = {}
    for n in (1, 2):
        small = dataclasses.replace(m, n_layers=n, moe_layer_interval=1)
        per[n] = activation_memory(small, vocab, batch, seq, torch.bfloat16)
    out = {"experiment": experiment, "model": m.name, "n_layers": m.n_layers, "seq": seq}
    for mode in ("none", "selective", "full"):
        key = f"{mode}_bytes_per_token"
        block = per[2][key] - per[1][key]
        rest = per[1][key] - block
        copies = per[2][f"{mode}_weight_copy_bytes"] - per[1][f"{mode}_weight_copy_bytes"]
        out[mode] = {
            "per_block": block,
            "rest": rest,
            "total": rest + m.n_layers * block,
            "weight_copy_bytes_per_block": copies,
        }
    return out


def compile_benchmark(quick: bool) -> dict:
    """Training step (forward + backward) of a small MoE model with each block's attention, norms
    and dense FFN compiled (inductor; aot_eager with --quick) vs eager, 1 thread; the first
    compiled steps (compilation)
    are excluded and timed separately."""
    from components.model.transformer import Transformer

    torch.set_num_threads(1)
    cfg = ModelConfig(
        dim=64 if quick else 256,
        n_heads=4,
        n_layers=2 if quick else 4,
        ffn_dim=128 if quick else 512,
        num_experts=8,
        top_k=2,
        max_seq_len=256,
        moe_layer_interval=2,
        shared_expert=True,
        dropless=True,
    )
    vocab, batch, seq = 512, (2 if quick else 8), (32 if quick else 256)
    tokens = torch.randint(0, vocab, (batch, seq + 1))

    def build(backend):
        torch.manual_seed(0)
        model = Transformer(cfg, vocab).train()
        model.configure_training("none", backend)
        return model

    def step(model):
        logits, aux = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)
        )
        (loss + aux["aux_loss"]).backward()
        for p in model.parameters():
            p.grad = None

    # --quick (the test suite's smoke run) traces with aot_eager: inductor's C++ compilation
    # takes minutes on a busy 2-core machine; the full run measures inductor
    backend = "aot_eager" if quick else "inductor"
    eager, compiled = build(None), build(backend)
    start = time.perf_counter()
    step(compiled)
    step(compiled)
    compile_s = time.perf_counter() - start
    warmup, iters = (1, 3) if quick else (2, 10)
    t_eager = _median_time(lambda: step(eager), warmup, iters)
    t_compiled = _median_time(lambda: step(compiled), warmup, iters)
    return {
        "compile_vs_eager_step_ratio": t_compiled / t_eager,
        "eager_step_s": t_eager,
        "compiled_step_s": t_compiled,
        "compile_s": compile_s,
        "tokens_per_step": batch * seq,
        "threads": 1,
        "backend": backend,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", dest="json_out", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for tests")
    parser.add_argument(
        "--chunks", type=int, default=2, help="a2a chunks with overlap on (default 2)"
    )
    parser.add_argument(
        "--shared-expert",
        action="store_true",
        help="part 2's model with a shared expert (what hides the count exchange)",
    )
    parser.add_argument(
        "--model-memory",
        metavar="EXPERIMENT",
        help="only print the activation bytes per token of this experiment's model "
        "(e.g. gpu_small: moe_small at 1024 tokens)",
    )
    args = parser.parse_args(argv)
    if args.model_memory:
        figures = model_memory(args.model_memory)
        figures["load_average_1m"] = os.getloadavg()[0]
        print(json.dumps(figures, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(figures, indent=2))
        return figures

    # headline figures single-threaded: on a shared 2-core machine every intra-op parallel region
    # of a 2-thread run stalls whenever another process holds a core, which punishes the MoE
    # layer's many smaller matmuls far more than the dense MLP's three big ones; 2 threads is
    # reported too
    print("part 1: one MoE layer vs dense and naive (1 thread, then 2)", flush=True)
    layer = layer_benchmark(args.quick, threads=1)
    layer_2 = layer_benchmark(args.quick, threads=2)
    syncs_single = single_rank_host_syncs(args.quick)
    print("part 2: 2-worker expert-parallel training step, overlap off vs on", flush=True)
    ep = ep_benchmark(args.quick, args.chunks, args.shared_expert)
    print(
        "part 3: activation memory per token (checkpointing none/selective/full), compile",
        flush=True,
    )
    memory = activation_memory(
        ModelConfig(
            dim=64,
            n_heads=4,
            n_layers=4,
            ffn_dim=128,
            num_experts=8,
            top_k=2,
            max_seq_len=256,
            moe_layer_interval=1,
            shared_expert=True,
            dropless=True,
        ),
        vocab=512,
        batch=2,
        seq=32 if args.quick else 256,
    )
    compile_figures = compile_benchmark(args.quick)
    syncs_ep = {name: ep[name].pop("host_syncs_per_moe_layer_forward") for name in ("off", "on")}
    for rank_figures in ep["per_rank"]:
        for figures in rank_figures.values():
            figures.pop("host_syncs_per_moe_layer_forward", None)
    result = {
        "benchmark": "bench_moe",
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "moe_vs_dense_ratio": layer["moe_vs_dense_ratio"],
        "moe_vs_naive_ratio": layer["moe_vs_naive_ratio"],
        "moe_vs_dense_ratio_best": layer["moe_vs_dense_ratio_best"],
        "moe_vs_dense_ratio_cpu_time": layer["moe_vs_dense_ratio_cpu_time"],
        "overlap_on_vs_off_step_ratio": ep["overlap_on_vs_off_step_ratio"],
        "exposed_comm_fraction": ep["exposed_comm_fraction"],
        "best_possible_on_vs_off_ratio": ep["best_possible_on_vs_off_ratio"],
        "host_syncs_per_moe_layer_forward": syncs_ep["on"]["total"],
        "grouped_mm_vs_loop_ratio": layer["grouped_mm_vs_loop_ratio"],
        "activation_bytes_per_token": {
            k: memory[f"{k}_bytes_per_token"] for k in ("none", "selective", "full")
        },
        "activation_memory": memory,
        "compile_vs_eager_step_ratio": compile_figures["compile_vs_eager_step_ratio"],
        "compile": compile_figures,
        "host_syncs": {
            "expert_parallel_overlap_on": syncs_ep["on"],
            "expert_parallel_overlap_off": syncs_ep["off"],
            "single_rank_loop": syncs_single["loop"],
            "single_rank_grouped_mm": syncs_single["grouped_mm"],
        },
        "measured_on": "cpu (no GPU figure in this file)",
        "goals": GOALS,
        "layer": layer,
        "layer_2threads": layer_2,
        "expert_parallel_step": ep,
    }
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "moe_vs_dense_ratio",
                    "moe_vs_dense_ratio_best",
                    "moe_vs_dense_ratio_cpu_time",
                    "moe_vs_naive_ratio",
                    "grouped_mm_vs_loop_ratio",
                    "overlap_on_vs_off_step_ratio",
                    "exposed_comm_fraction",
                    "best_possible_on_vs_off_ratio",
                    "host_syncs_per_moe_layer_forward",
                    "activation_bytes_per_token",
                    "compile_vs_eager_step_ratio",
                    "load_average_1m",
                )
            },
            indent=2,
        )
    )
    print(
        f"MoE layer, 2 threads: vs dense {layer_2['moe_vs_dense_ratio']:.2f}x, vs naive "
        f"{layer_2['moe_vs_naive_ratio']:.2f}x"
    )
    for name in ("off", "on"):
        r = ep[name]
        print(
            f"EP step overlap {name:>3}: {r['step_s'] * 1e3:8.1f} ms = compute "
            f"{r['compute_s'] * 1e3:7.1f} "
            f"+ exposed a2a {r['a2a_exposed_s'] * 1e3:6.1f} (of {r['a2a_total_s'] * 1e3:6.1f} in "
            "flight) "
            f"+ grad all-reduce {r['allreduce_s'] * 1e3:6.1f} + data wait "
            f"{r['data_wait_s'] * 1e3:5.2f}"
        )
    return result


if __name__ == "__main__":
    main()
