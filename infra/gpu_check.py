"""GPU check of the MoE layer, for an operator on one node with 1-8 GPUs (`make gpu-check`,
minutes).

    python infra/gpu_check.py --json gpu-check.json            # every visible GPU (at most 8)
    python infra/gpu_check.py --gpus 4 --json gpu-check.json   # the first 4
    python infra/gpu_check.py --device cpu --gpus 2 --quick    # rehearsal of the same checks on CPU
    + gloo

One process per GPU, NCCL, expert parallelism over all of them (EP size = GPUs). Checks, each
recorded pass/fail in the JSON with its figures:

1. ``grouped_mm_equals_loop`` — the experts via ``F.grouped_mm`` and via the per-expert loop give
   the same outputs and gradients in bf16 (and which backend ``auto`` picks on this GPU), plus
   their forward+backward times.
2. ``expert_parallel_matches_reference`` — the EP model (NCCL all-to-all) gives the logits and
   gradients of the single-process model, for overlap off / on and loop / grouped_mm: logits of
   the rank's own batch, non-expert gradients of its own loss, expert gradients of the sum of all
   ranks' losses. fp32 with TF32 off for the loop; bf16 autocast for grouped_mm.
3. ``bf16_payloads`` — under bf16 autocast the all-to-all carries bf16 rows, gates and combine
   stay fp32, and the logits stay close to fp32.
4. ``host_syncs`` — host syncs of one MoE layer forward, counted by
   ``components.model.host_sync.HostSyncCounter`` and run under CUDA's own detector in "error"
   mode (``torch.cuda.set_sync_debug_mode``): one, the documented split-size read, is expected.
5. ``overlap_benchmark`` — an EP training step in bf16, overlap off vs on: step time, exposed and
   total all-to-all time from CUDA events (needs 2+ GPUs; figures only, no pass/fail).

Before them, on rank 0: ``full_model_step`` (moe_small and its dense equivalent: tokens/s, MFU,
peak memory, the step's host syncs under ``set_sync_debug_mode("error")``, GPU vs CPU) and
``decode`` (bf16 and int8 decode tokens/s through ``components.model.generate``).

Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA (or bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.config.schema import ModelConfig, OverlapConfig  # noqa: E402
from components.model import Transformer, is_expert_param  # noqa: E402
from components.model.experts import GroupedExperts  # noqa: E402
from components.model.export import shard_experts  # noqa: E402
from components.model.host_sync import HostSyncCounter  # noqa: E402

MAX_GPUS = 8
# per size: (dim, n_heads, n_layers, ffn_dim, batch, seq, steps) of the overlap benchmark
BENCH_SIZES = {"full": (1024, 16, 4, 2048, 8, 1024, 20), "quick": (64, 4, 2, 128, 2, 32, 3)}


class Check:
    """Collects one check's verdict and figures."""

    def __init__(self, results: dict, name: str):
        self.record = results.setdefault(name, {"passed": True, "problems": []})

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.record["passed"] = False
            self.record["problems"].append(problem)

    def figure(self, **values) -> None:
        self.record.update(values)


def _loss(model, batch):
    logits, aux = model(batch[:, :-1])
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    return ce + aux["aux_loss"] + aux["z_loss"], logits


def _time_cuda(fn, device, iters: int) -> float:
    """Median seconds of fn() (synchronised: a benchmark, not the hot path)."""
    times = []
    for _ in range(iters + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


# ----------------------------------------------------------------------------- checks
def check_grouped_mm(results: dict, device, quick: bool) -> None:
    check = Check(results, "grouped_mm_equals_loop")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # moe_small's real shapes at EP 1: 16 experts of 768 -> 2048, 8 x 1024 tokens x top-2 rows
    E, D, H, rows = (4, 64, 128, 256) if quick else (16, 768, 2048, 16384)
    torch.manual_seed(0)
    loop = GroupedExperts(E, D, H, "loop").to(device)
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_(std=0.02)
    grouped = GroupedExperts(E, D, H, "grouped_mm").to(device)
    grouped.load_state_dict(loop.state_dict())
    auto = GroupedExperts(E, D, H, "auto").to(device)
    gen = torch.Generator().manual_seed(1)
    counts = torch.multinomial(torch.ones(E), rows, replacement=True, generator=gen).bincount(
        minlength=E
    )
    counts[1] = 0  # an empty group
    x = torch.randn(int(counts.sum()), D, generator=gen).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)

    def run(experts, counts_arg):
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = experts(xi, counts_arg)
        out.float().backward(grad)
        return out.float(), [xi.grad] + [p.grad for p in (experts.w1, experts.w3, experts.w2)]

    out_loop, grads_loop = run(loop, counts.tolist())
    out_grouped, grads_grouped = run(grouped, counts.to(device))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    scale = out_loop.abs().max().item()
    err = (out_loop - out_grouped).abs().max().item()
    check.expect(err <= tol * max(scale, 1.0), f"outputs differ by {err:.3g} (scale {scale:.3g})")
    grad_errs = []
    for name, a, b in zip(("x", "w1", "w3", "w2"), grads_loop, grads_grouped):
        e = (a.float() - b.float()).abs().max().item()
        grad_errs.append(e)
        check.expect(
            e <= tol * max(a.abs().max().item(), 1.0), f"gradient of {name} differs by {e:.3g}"
        )
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        auto_picks = "grouped_mm" if auto.uses_grouped_mm(x) else "loop"
    loop_s = _time_cuda(lambda: run(loop, counts.tolist()), device, 3 if quick else 10)
    grouped_s = _time_cuda(lambda: run(grouped, counts.to(device)), device, 3 if quick else 10)
    check.figure(
        dtype=str(dtype),
        max_output_diff=err,
        max_grad_diff=max(grad_errs),
        auto_picks=auto_picks,
        loop_fwd_bwd_s=loop_s,
        grouped_mm_fwd_bwd_s=grouped_s,
        grouped_mm_speedup=loop_s / grouped_s,
    )


def _model_cfg(world: int, quick: bool, **overrides) -> ModelConfig:
    base = dict(
        dim=64,
        n_heads=4,
        n_layers=2,
        ffn_dim=128,
        num_experts=2 * world,
        top_k=2,
        capacity_factor=1.0,
        shared_expert=True,
        max_seq_len=64,
        moe_layer_interval=1,
    )
    return ModelConfig(**{**base, **overrides})


def check_expert_parallel(results: dict, device, rank: int, world: int, group, quick: bool) -> None:
    check = Check(results, "expert_parallel_matches_reference")
    bf16 = device.type == "cuda"
    variants = {
        "overlap_off_loop": (OverlapConfig(async_a2a=False, a2a_chunks=1), "loop", False),
        "overlap_on_loop": (OverlapConfig(async_a2a=True, a2a_chunks=2), "loop", False),
        "overlap_on_chunks3_loop": (OverlapConfig(async_a2a=True, a2a_chunks=3), "loop", False),
    }
    if bf16:  # F.grouped_mm runs bf16 on CUDA
        variants["overlap_on_grouped_mm_bf16"] = (
            OverlapConfig(async_a2a=True, a2a_chunks=2),
            "grouped_mm",
            True,
        )
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 128, (2, 17), generator=gen).to(device) for _ in range(world)]
    figures = {}
    for name, (overlap, backend, autocast) in variants.items():
        cfg = _model_cfg(world, quick, expert_backend=backend)
        torch.manual_seed(0)
        reference = Transformer(cfg, 128).to(device).train()
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        ref_logits, ref_grads = [], []
        for batch in batches:
            reference.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, logits = _loss(reference, batch)
            loss.backward()
            ref_logits.append(logits.detach().float())
            ref_grads.append({n: p.grad.detach().clone() for n, p in reference.named_parameters()})
        model = Transformer(cfg, 128, ep_group=group, overlap=overlap).to(device).train()
        model.load_state_dict(shard_experts(state, rank, world))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, logits = _loss(model, batches[rank])
        loss.backward()
        tol = 3e-2 if autocast else 1e-4
        logit_err = (logits.detach().float() - ref_logits[rank]).abs().max().item()
        check.expect(
            logit_err <= tol * max(ref_logits[rank].abs().max().item(), 1.0),
            f"{name}: logits differ by {logit_err:.3g}",
        )
        El = cfg.num_experts // world
        worst = 0.0
        for pname, p in model.named_parameters():
            if is_expert_param(p):
                want = sum(g[pname] for g in ref_grads)[rank * El : (rank + 1) * El]
            else:
                want = ref_grads[rank][pname]
            err = (p.grad - want).abs().max().item()
            worst = max(worst, err)
            check.expect(
                err <= tol * max(want.abs().max().item(), 1.0),
                f"{name}: gradient of {pname} differs by {err:.3g}",
            )
        figures[name] = {"max_logit_diff": logit_err, "max_grad_diff": worst}
    check.figure(variants=figures)


def check_bf16_payloads(results: dict, device, rank: int, world: int, group, quick: bool) -> None:
    check = Check(results, "bf16_payloads")
    cfg = _model_cfg(world, quick)
    torch.manual_seed(0)
    model = (
        Transformer(cfg, 128, ep_group=group, overlap=OverlapConfig(async_a2a=True, a2a_chunks=2))
        .to(device)
        .train()
    )
    received = []
    model.moe_layers()[0].experts.register_forward_pre_hook(
        lambda mod, args: received.append(args[0].dtype)
    )
    batch = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(rank)).to(device)
    with torch.no_grad():
        _, fp32_logits = _loss(model, batch)
        received.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            moe_out, _ = model.moe_layers()[0](torch.randn(34, cfg.dim, device=device))
            _, bf16_logits = _loss(model, batch)
    check.expect(
        all(d == torch.bfloat16 for d in received) and received, f"experts received {received}"
    )
    check.expect(
        moe_out.dtype == torch.float32,
        f"MoE output {moe_out.dtype}: the combine must accumulate in fp32",
    )
    rel = (
        (bf16_logits.float() - fp32_logits).abs().max() / fp32_logits.abs().max().clamp(min=1e-6)
    ).item()
    check.expect(rel < 0.05, f"bf16 logits differ from fp32 by {rel:.3g} of their scale")
    check.figure(received_dtypes=sorted({str(d) for d in received}), bf16_vs_fp32_rel_diff=rel)


def check_host_syncs(results: dict, device, world: int, group, quick: bool) -> None:
    check = Check(results, "host_syncs")
    cfg = _model_cfg(world, quick)
    torch.manual_seed(0)
    model = (
        Transformer(cfg, 128, ep_group=group, overlap=OverlapConfig(async_a2a=True, a2a_chunks=2))
        .to(device)
        .train()
    )
    layer = model.moe_layers()[0]
    x = torch.randn(256, cfg.dim, device=device)
    layer(x)  # warm up: first calls may allocate and initialise NCCL
    expected = 1 if world > 1 else (0 if layer.experts.uses_grouped_mm(x) else 1)

    def forward(scope):
        with scope():
            layer(x)

    # gloo on CUDA (two ranks sharing one GPU) stages every collective through host memory and
    # synchronises its stream to do so, by design: CUDA's detector would stop at the all-to-all
    # itself, so there the counter alone decides; NCCL (2+ GPUs) runs under "error"
    nccl = group is not None and dist.get_backend(group) == "nccl"
    debug = _sync_debug(forward, device, error_mode=device.type == "cuda" and (nccl or world == 1))
    if device.type == "cuda" and not debug["mode"].startswith("set_sync"):
        debug["mode"] += " (gloo on CUDA: collectives sync through the host)"
    check.expect(
        debug["unexpected_sync"] is None,
        f"a sync outside the documented ones: {debug['unexpected_sync']}",
    )
    check.expect(
        not debug["undocumented"],
        f"host syncs outside the documented ones: {debug['undocumented']}",
    )
    counted = sum(debug["documented"].values())
    check.expect(
        counted == expected,
        f"counted {counted} documented host syncs ({debug['documented']}), expected {expected}",
    )
    check.figure(
        counted=counted,
        by_op=debug["by_op"],
        documented=debug["documented"],
        sync_debug_mode=debug["mode"],
        expected=expected,
    )


def overlap_benchmark(results: dict, device, rank: int, world: int, group, quick: bool) -> None:
    record = results.setdefault("overlap_benchmark", {"passed": True, "problems": []})
    if world < 2:
        record["skipped"] = "needs 2+ GPUs (expert parallelism)"
        return
    D, heads, layers, ffn, batch, seq, steps = BENCH_SIZES["quick" if quick else "full"]
    cfg = ModelConfig(
        dim=D,
        n_heads=heads,
        n_layers=layers,
        ffn_dim=ffn,
        num_experts=max(8, 2 * world) // world * world,
        top_k=2,
        dropless=True,
        max_seq_len=seq,
        moe_layer_interval=1,
    )
    autocast = device.type == "cuda"
    variants = {
        "off": OverlapConfig(async_a2a=False, a2a_chunks=1),
        "on": OverlapConfig(async_a2a=True, a2a_chunks=2),
    }
    models, optims = {}, {}
    for name, overlap in variants.items():
        torch.manual_seed(0)
        models[name] = Transformer(cfg, 1024, ep_group=group, overlap=overlap).to(device).train()
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(100 + rank)
    figures = {name: [] for name in variants}

    def step(name):
        model, optim = models[name], optims[name]
        tokens = torch.randint(0, 1024, (batch, seq + 1), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = _loss(model, tokens)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - start
        comm = model.comm_times(reset=True)
        return {"step_s": step_s, "a2a_exposed_s": comm.exposed_s, "a2a_total_s": comm.total_s}

    for _ in range(2):
        for name in variants:
            step(name)
            models[name].comm_times(reset=True)
    for _ in range(steps):
        for name in variants:
            figures[name].append(step(name))
    summary = {
        name: {k: statistics.fmean(r[k] for r in recs) for k in recs[0]}
        for name, recs in figures.items()
    }
    off, on = summary["off"], summary["on"]
    record.update(
        off=off,
        on=on,
        tokens_per_gpu=batch * seq,
        model=cfg.__dict__,
        precision="bf16" if autocast else "fp32",
        overlap_on_vs_off_step_ratio=on["step_s"] / off["step_s"],
        exposed_comm_fraction=on["a2a_exposed_s"] / max(on["a2a_total_s"], 1e-12),
        best_possible_on_vs_off_ratio=1 - off["a2a_exposed_s"] / off["step_s"],
    )


# ----------------------------------------------------------------------------- driver
# dense bf16 tensor-core peak (no sparsity), FLOP/s, by device name; unknown devices get no MFU
BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def bf16_peak(name: str) -> float | None:
    """The device's dense bf16 peak from its name (longest matching key), None if unknown."""
    hits = [key for key in BF16_PEAK if key in name]
    return BF16_PEAK[max(hits, key=len)] if hits else None


def step_flops(model, tokens: int, seq: int) -> float:
    """Training FLOPs of one step: 6 x active parameters per token (forward 2, backward 4), plus
    attention's score and value products, 12 x layers x dim x seq per token (PaLM's count, not
    halved for causality)."""
    cfg = model.cfg
    return tokens * (6 * model.num_params(active=True) + 12 * cfg.n_layers * cfg.dim * seq)


def _full_model_cfg(quick: bool, kind: str = "moe") -> ModelConfig:
    """moe_small's shape (conf/model/moe_small.yaml) at full size; a small one for --quick."""
    if quick:
        return ModelConfig(
            name="quick",
            dim=64,
            n_heads=4,
            n_layers=2,
            ffn_dim=128,
            num_experts=4,
            top_k=2,
            max_seq_len=64,
            shared_expert=True,
            dropless=True,
            kind=kind,
        )
    return ModelConfig(
        name="moe_small",
        dim=768,
        n_layers=12,
        n_heads=12,
        ffn_dim=2048,
        max_seq_len=2048,
        num_experts=16,
        top_k=2,
        capacity_factor=1.25,
        shared_expert=True,
        kind=kind,
    )


def check_full_model_step(results: dict, device, quick: bool) -> None:
    """A full-model training step of moe_small and of its dense equivalent (equal active
    parameters) as `train=gpu` runs it on one GPU: bf16 autocast, fp32 master weights, AdamW
    (fused on CUDA), selective activation checkpointing. tokens/s, MFU against the device's bf16
    peak, peak memory; then the GPU's logits and gradients against the same model on the CPU."""
    from components.config.schema import TrainConfig
    from components.model.transformer import dense_equivalent
    from components.training.loss import chunked_cross_entropy
    from components.training.optim import build_optimizer

    check = results["full_model_step"] = {"passed": True, "problems": []}
    vocab, batch, seq, steps = (256, 2, 32, 3) if quick else (32768, 8, 1024, 10)
    peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    moe_cfg = _full_model_cfg(quick)
    for name, cfg in (("moe", moe_cfg), ("dense", dense_equivalent(moe_cfg))):
        torch.manual_seed(0)
        model = Transformer(cfg, vocab).to(device)
        model.configure_training("selective")
        optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
        gen = torch.Generator().manual_seed(1)
        data = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)

        def step(model=model, optimizer=optimizer, data=data, scope=contextlib.nullcontext):
            # scope: where _sync_debug watches for host syncs (nothing when timing)
            with scope():
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
                ):
                    logits, aux = model(data[:, :-1])
                loss = chunked_cross_entropy(logits, data[:, 1:])  # as the training step does
                (loss + aux["aux_loss"] + aux["z_loss"]).backward()
            # CUDA: fused AdamW, watched too. CPU: foreach AdamW reads every parameter's step
            # count, a host tensor by design (no device sync, but the counter would count it)
            with scope() if device.type == "cuda" else contextlib.nullcontext():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        step()  # warm-up: allocations, kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        float(loss)  # waits for the last step
        seconds = (time.perf_counter() - start) / steps
        flops = step_flops(model, batch * seq, seq)
        check[name] = {
            "model": cfg.name,
            "params_total": model.num_params(),
            "params_active": model.num_params(active=True),
            "tokens_per_step": batch * seq,
            "step_s": seconds,
            "tokens_per_s": batch * seq / seconds,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
            if device.type == "cuda"
            else None,
            "loss": float(loss),
        }
        if not torch.isfinite(loss):
            check["passed"] = False
            check["problems"].append(f"{name}: loss {float(loss)}")
        debug = _sync_debug(lambda scope, step=step: step(scope=scope), device)
        debug["expected"] = _expected_step_syncs(model, data, device)
        check[name]["sync_debug"] = debug
        if (
            debug["unexpected_sync"]
            or debug["undocumented"]
            or debug["documented"] != debug["expected"]
        ):
            check["passed"] = False
            check["problems"].append(f"{name}: host syncs in a bf16 step: {debug}")
        del model, optimizer
    check["moe_vs_dense_tokens_per_s"] = (
        check["moe"]["tokens_per_s"] / check["dense"]["tokens_per_s"]
    )
    check["bf16_peak_flops"] = peak
    if device.type == "cuda":
        _gpu_vs_cpu(check, device, moe_cfg, vocab, quick)


def _expected_step_syncs(model, data, device) -> dict[str, int]:
    """The documented syncs (docs/model.md "Host syncs") of one single-rank training step: none
    when the experts run as grouped GEMM (the group sizes stay on the device), with the loop
    backend its counts read once per MoE layer (``loop_expert_counts``)."""
    layers = model.moe_layers()
    if not layers:
        return {}
    probe = torch.zeros(8, model.cfg.dim, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        grouped = layers[0].experts.uses_grouped_mm(probe)
    return {} if grouped else {"loop_expert_counts": len(layers)}


def _sync_debug(run, device, error_mode: bool = True) -> dict:
    """Host syncs of ``run(scope)`` (a bf16 training step, a layer forward) inside the ``with
    scope():`` blocks it opens.

    On CUDA a scope runs under ``torch.cuda.set_sync_debug_mode("error")``: the documented syncs
    (``components.model.host_sync.documented_sync``) set "default" for their own duration, so any
    other sync raises where it happens; its message's first line goes to ``unexpected_sync``.
    Everywhere, ``HostSyncCounter`` files what it counts under the documented name it happened in
    or as ``undocumented`` (on CPU, the rehearsal, that is the check; and on CUDA without
    ``error_mode``)."""
    cuda = device.type == "cuda" and error_mode
    syncs = HostSyncCounter()
    unexpected: list[str] = []

    @contextlib.contextmanager
    def scope():
        with syncs:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            except RuntimeError as err:
                if not cuda or "synchroniz" not in str(err):
                    raise
                unexpected.append(str(err).strip().splitlines()[0])
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    run(scope)
    # on CUDA the counter also sees ops on host tensors, which are no GPU sync: there the error
    # mode decides and the counter's figures are for reading
    return {
        "mode": 'set_sync_debug_mode("error")' if cuda else "HostSyncCounter",
        "documented": dict(syncs.documented),
        "undocumented": {} if cuda else dict(syncs.undocumented),
        "by_op": dict(syncs.by_op),
        "unexpected_sync": unexpected[0] if unexpected else None,
    }


def _decode_rate(model, prompts: list[list[int]], new_tokens: int, device) -> dict:
    """Greedy decoding through the serving path (``components.model.generate.generate``: KV cache,
    one forward per token, the sampled ids read back every step as the server does): tokens/s
    over a timed second run (the first warms up kernels and allocations)."""
    from components.model.generate import generate

    generate(model, prompts, 2, temperature=0.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    produced = sum(len(o) for o in out)
    return {
        "batch": len(prompts),
        "prompt_tokens": len(prompts[0]),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": produced / seconds,
    }


def check_decode(results: dict, device, quick: bool) -> None:
    """bf16 and int8 decode throughput of moe_small (random weights: speed, not quality).

    bf16 on the device. int8 through ``quantize_for_inference``, the serving path: on CUDA that is
    torchao's weight-only int8 where torchao is installed; torch's own int8 (dynamic quantisation,
    fbgemm) runs on CPU only, so without torchao (the bare mode) int8 is measured on this node's
    CPU, beside the CPU's fp32 rate at the same size, and says so (``device``, ``reason``)."""
    from components.model.quantize import quantize_for_inference

    check = Check(results, "decode")
    vocab = 256 if quick else 32768
    cfg = _full_model_cfg(quick)
    batch, prompt_len, new = (2, 8, 8) if quick else (8, 128, 128)
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=gen).tolist()
    torch.manual_seed(0)
    cpu_model = Transformer(cfg, vocab).eval()

    model = Transformer(cfg, vocab).eval()
    model.load_state_dict(cpu_model.state_dict())
    model = model.to(device=device, dtype=torch.bfloat16)
    bf16 = _decode_rate(model, prompts, new, device)
    check.figure(bf16={**bf16, "device": str(device)})
    del model

    int8: dict = {}
    if device.type == "cuda":
        try:
            model = copy.deepcopy(cpu_model).to(device=device, dtype=torch.bfloat16)
            quantized, label = quantize_for_inference(model, "int8", device)
            int8 = {**_decode_rate(quantized, prompts, new, device), "device": str(device)}
            int8["path"] = label
            del model, quantized
        except ImportError:  # torchao is an optional extra (not in the bare mode)
            int8["reason"] = (
                "no int8 path on CUDA here (torchao not installed); torch's own dynamic int8 "
                "quantisation runs on CPU only, so int8 is measured on the CPU"
            )
        except Exception as err:  # a broken torchao must not hide the other figures
            int8["reason"] = f"torchao int8 on CUDA failed ({err!r}); measured on the CPU"
            check.expect(False, f"int8 on CUDA: {err!r}")
    if "tokens_per_s" not in int8:
        # the CPU pair at a size the CPU decodes in seconds (1-2 tokens/s per sequence at full size)
        cpu_batch, cpu_new = (2, 8) if quick else (4, 16)
        cpu_prompts = [p[:prompt_len] for p in prompts[:cpu_batch]]
        fp32 = _decode_rate(cpu_model, cpu_prompts, cpu_new, torch.device("cpu"))
        quantized, label = quantize_for_inference(cpu_model, "int8", "cpu")
        int8 = {
            **int8,
            **_decode_rate(quantized, cpu_prompts, cpu_new, torch.device("cpu")),
            "device": "cpu",
            "path": label,
            "cpu_fp32_tokens_per_s": fp32["tokens_per_s"],
        }
        int8.setdefault(
            "reason", "the CPU rehearsal" if device.type == "cpu" else "no CUDA int8 path"
        )
    check.figure(int8=int8)
    for name, rate in (("bf16", bf16), ("int8", int8)):
        check.expect(rate["tokens_per_s"] > 0, f"{name} decoded nothing")


def _gpu_vs_cpu(check: dict, device, cfg: ModelConfig, vocab: int, quick: bool) -> None:
    """fp32 (TF32 off) logits and gradients of the full model on the GPU vs on the CPU."""
    torch.manual_seed(0)
    cpu_model = Transformer(cfg, vocab)
    gpu_model = Transformer(cfg, vocab).to(device)
    gpu_model.load_state_dict(cpu_model.state_dict())
    batch = torch.randint(
        0, vocab, (1, (32 if quick else 256) + 1), generator=torch.Generator().manual_seed(2)
    )
    grads = []
    for model, dev in ((cpu_model, torch.device("cpu")), (gpu_model, device)):
        logits, aux = model(batch[:, :-1].to(dev))
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1).to(dev))
        loss.backward()
        grads.append(
            (logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()})
        )
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = grads
    logit_err = (cpu_logits - gpu_logits).abs().max().item()
    grad_err = max(
        ((cpu_grads[n] - gpu_grads[n]).norm() / cpu_grads[n].norm().clamp(min=1e-12)).item()
        for n in cpu_grads
    )
    check["gpu_vs_cpu"] = {"logits_max_abs": logit_err, "grads_max_rel": grad_err}
    if logit_err > 1e-3 or grad_err > 1e-3:
        check["passed"] = False
        check["problems"].append(f"GPU vs CPU: logits {logit_err:.2e}, grads {grad_err:.2e}")


def versions() -> dict:
    """torch, CUDA runtime, cuDNN, NCCL and the driver (from nvidia-smi, when present)."""
    import shutil
    import subprocess

    out = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        nccl = torch.cuda.nccl.version() if dist.is_nccl_available() else None
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else None
    return out


def hf_checks(device: str) -> dict:
    """transformers / vLLM greedy parity (infra/gpu_check_hf.py); skipped where that module or its
    libraries are missing (a bare torch machine)."""
    if device != "cuda":  # its CPU rehearsal is tests/unit/infra/test_gpu_check_hf.py
        return {"status": "skipped: CPU rehearsal"}
    try:
        from infra.gpu_check_hf import run_hf_checks
    except ModuleNotFoundError as err:  # only the module's absence: its own errors propagate
        return {"status": f"skipped: {err.name} not importable"}
    return run_hf_checks(device)


def _worker(rank: int, world: int, port: int, opts: dict, out_dir: str) -> None:
    # one GPU, two ranks (--share-gpu): both on cuda:0 over gloo-on-CUDA, since NCCL refuses two
    # ranks on one device; with 2+ GPUs one rank per GPU over NCCL
    shared = opts.get("share_gpu", False)
    gpu = 0 if shared else rank
    device = torch.device("cuda", gpu) if opts["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # the fp32 comparisons are against exact fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if device.type == "cuda" and not shared else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    group = dist.group.WORLD if world > 1 else None
    results: dict = {}
    quick = opts["quick"]
    steps = [
        ("grouped_mm_equals_loop", lambda: check_grouped_mm(results, device, quick)),
        (
            "expert_parallel_matches_reference",
            lambda: check_expert_parallel(results, device, rank, world, group, quick),
        ),
        ("bf16_payloads", lambda: check_bf16_payloads(results, device, rank, world, group, quick)),
        ("host_syncs", lambda: check_host_syncs(results, device, world, group, quick)),
        (
            "overlap_benchmark",
            lambda: overlap_benchmark(results, device, rank, world, group, quick),
        ),
    ]
    if rank == 0 and not opts.get("skip_full_model"):
        steps[:0] = [
            ("full_model_step", lambda: check_full_model_step(results, device, quick)),
            ("decode", lambda: check_decode(results, device, quick)),
        ]
    try:
        for name, run in steps:
            start = time.perf_counter()
            run()
            results[name]["seconds"] = time.perf_counter() - start
            if rank == 0:
                print(f"  {name}: {results[name]['seconds']:.1f}s", flush=True)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, default=str))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 (no project import beyond components/: the bare mode)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _merge(per_rank: list[dict]) -> dict:
    """Checks pass only if they pass on every rank; figures of rank 0, problems of all ranks
    (rank 0 alone runs the single-process full-model step)."""
    merged = {}
    for name, record in per_rank[0].items():
        ranks = [res for res in per_rank if name in res]
        problems = [f"rank {r}: {p}" for r, res in enumerate(ranks) for p in res[name]["problems"]]
        merged[name] = {
            **record,
            "passed": all(res[name]["passed"] for res in ranks),
            "problems": problems,
        }
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help=f"GPUs to use (default: all visible, at most {MAX_GPUS})",
    )
    parser.add_argument("--json", dest="json_out", help="write the results here")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (seconds instead of minutes)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: rehearse the same checks with gloo processes (no CUDA-only figures)",
    )
    parser.add_argument(
        "--skip-full-model", action="store_true", help="leave out the full-model training step"
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        build = (
            "a CPU-only build"
            if torch.version.cuda is None
            else f"built for CUDA {torch.version.cuda}"
        )
        print(
            f"gpu-check: no CUDA device visible (torch {torch.__version__}, {build}). Run it on a "
            "GPU node "
            f"with a CUDA build of torch; `--device cpu` only rehearses the checks.",
            file=sys.stderr,
        )
        return 2
    available = torch.cuda.device_count() if args.device == "cuda" else MAX_GPUS
    world = args.gpus or min(available, MAX_GPUS)
    # one GPU: two ranks share it (gloo on CUDA), so expert parallelism is really exercised
    # instead of the model being compared with itself
    share_gpu = args.device == "cuda" and world == 1
    if share_gpu:
        world = 2
        available = 2
    if not 1 <= world <= min(available, MAX_GPUS):
        print(
            f"gpu-check: --gpus {args.gpus}: this node has {available} usable (at most {MAX_GPUS})",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not share_gpu and not dist.is_nccl_available():
        print("gpu-check: this torch build has no NCCL", file=sys.stderr)
        return 2

    import torch.multiprocessing as mp

    print(
        f"gpu-check: {world} {'GPU' if args.device == 'cuda' else 'CPU process'}(es), EP size "
        f"{world}"
        f"{' (quick)' if args.quick else ''} ...",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(
                _worker,
                args=(
                    world,
                    _free_port(),
                    {
                        "device": args.device,
                        "quick": args.quick,
                        "share_gpu": share_gpu,
                        "skip_full_model": args.skip_full_model,
                    },
                    tmp,
                ),
                nprocs=world,
            )
        except (
            mp.ProcessException
        ) as err:  # a crash, not a failed comparison: the traceback says where
            print(f"gpu-check: FAILED, a worker crashed: {err}", file=sys.stderr)
            return 1
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    checks = _merge(per_rank)
    env = {
        "device": args.device,
        "processes": world,
        "backend": "gloo" if share_gpu or args.device == "cpu" else "nccl",
        "ranks_share_one_gpu": share_gpu,
        "torch": torch.__version__,
        "quick": args.quick,
        **versions(),
    }
    if args.device == "cuda":
        nccl = torch.cuda.nccl.version()
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
        )
    passed = all(c["passed"] for c in checks.values())
    hf = hf_checks(args.device)
    env["seconds"] = time.perf_counter() - started
    report = {"passed": passed, "environment": env, "checks": checks, "hf": hf}
    text = json.dumps(report, indent=2, default=str)
    if args.json_out:
        Path(args.json_out).write_text(text)
    for name, check in checks.items():
        status = "skipped" if "skipped" in check else ("ok" if check["passed"] else "FAILED")
        print(f"  {name:36s} {status}")
        for problem in check["problems"]:
            print(f"      {problem}")
    full = checks.get("full_model_step", {})
    if "moe" in full:
        print(
            f"  {'model':12s} {'params':>14s} {'tokens/s':>10s} {'TFLOP/s':>8s} "
            f"{'MFU':>6s} {'peak GB':>8s}"
        )
        for name in ("moe", "dense"):
            r = full[name]
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
            params = f"{r['params_total'] / 1e9:.3f}B/{r['params_active'] / 1e9:.3f}B"
            print(
                f"  {name:12s} {params:>14s} {r['tokens_per_s']:>10.0f} "
                f"{r['tflops_per_s']:>8.1f} {mfu:>6s} {mem:>8s}"
            )
        print(f"  MoE vs dense tokens/s {full['moe_vs_dense_tokens_per_s']:.2f}")
    decode = checks.get("decode", {})
    for name in ("bf16", "int8"):
        if name in decode:
            r = decode[name]
            where = f"{r['device']}, {r.get('path', name)}"
            extra = (
                f" (CPU fp32 {r['cpu_fp32_tokens_per_s']:.0f} tok/s; {r['reason']})"
                if "cpu_fp32_tokens_per_s" in r
                else ""
            )
            print(
                f"  decode {name}: {r['tokens_per_s']:.0f} tokens/s, batch {r['batch']} x "
                f"{r['new_tokens']} new ({where}){extra}"
            )
    print(f"  hf: {hf.get('status', 'ran')}")
    bench = checks.get("overlap_benchmark", {})
    if "overlap_on_vs_off_step_ratio" in bench:
        print(
            f"  overlap on/off step {bench['overlap_on_vs_off_step_ratio']:.3f}, exposed a2a "
            "fraction "
            f"{bench['exposed_comm_fraction']:.3f}, best possible "
            f"{bench['best_possible_on_vs_off_ratio']:.3f}"
        )
    print(
        f"gpu-check: {'passed' if passed else 'FAILED'} in {env['seconds']:.0f}s"
        f"{f' -> {args.json_out}' if args.json_out else ''}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
