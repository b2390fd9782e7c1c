"""int8 vs fp32 inference on CPU: speed where serving runs (moe_tiny), speed where compute
dominates (moe_small's layer sizes), perplexity of a model trained in this run on real text.

    python tests/benchmarks/bench_int8.py --json bench-int8.json           # full run (~5 min idle)
    python tests/benchmarks/bench_int8.py --quick --json /tmp/int8.json    # smoke run

int8 is ``components.model.quantize.quantize_for_inference(model, "int8", cpu)`` (fbgemm dynamic
int8, experts included); fp32 is the same model unquantised. Every speed figure alternates fp32
and int8 runs of the same work and takes the median of the per-pair ratios, by this process's
CPU time (the headline: the time it actually held a core, so other processes' load on this
shared machine mostly cancels out) and by wall time (``*.ratio``, noisier). Everything runs on
``--threads`` intra-op threads (default 1: what a serve replica with ``num_cpus <= 1`` gets; on a
shared 2-core machine 2 threads also make small ops crawl whenever another process holds a core).

1. Train ``moe_tiny`` (conf/model/moe_tiny.yaml) in process on the standard-library corpus
   (components/data/corpus.py) with the project's BPE tokenizer (vocab 4096, as data=stdlib):
   240 steps of 16 x 128 tokens, about 90 CPU-seconds; files are split into train and held-out
   before the tokenizer is trained.
2. ``int8_perplexity_change_pct``: held-out perplexity, int8 over fp32 (goal <= 2).
3. ``int8_vs_fp32_speed_ratio``: the trained moe_tiny serving requests: a batch of 16 held-out
   prompts of 32 tokens, prefill then 32 greedy decode steps with the KV cache, generated
   tokens/s int8 / fp32.
4. ``int8_vs_fp32_speed_ratio_compute_bound``: moe_small's layer sizes (dim 768, 16 experts of
   ffn 2048, top-2, shared expert; ``n_layers`` cut to 2 to bound memory and time, random
   weights), a prefill forward of 8 x 128 tokens, tokens/s int8 / fp32 (goal >= 1.5). The same
   model's serving requests (16 prompts, 16 new tokens) are reported too.
5. The "auto" rule (``int8_pays``) against the measurement: request ratios at sizes around its
   threshold plus the two above. int8 counts as faster (slower) at a size when every alternated
   pair says so by CPU time, else as indistinguishable; ``auto_int8_where_slower`` (must be 0)
   counts sizes where auto serves int8 but int8 was slower, ``auto_fp32_where_faster`` sizes
   where auto leaves a speed-up unused, ``auto_rule_matches_measurement`` is 1 when both are 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from components.config.schema import ModelConfig  # noqa: E402
from components.data.build import pack_rows  # noqa: E402
from components.data.corpus import iter_texts, list_stdlib  # noqa: E402
from components.data.tokenizer import TextTokenizer  # noqa: E402
from components.model import Transformer  # noqa: E402
from components.model.quantize import (  # noqa: E402
    AUTO_CPU_MIN_EXPERT_ELEMENTS,
    fused_float_copy,
    int8_pays,
    quantize_for_inference,
)
from components.model.quantize_check import int8_agreement  # noqa: E402
from components.training.optim import lr_factor, param_groups  # noqa: E402

GOALS = {
    "int8_vs_fp32_speed_ratio_compute_bound": ">= 1.5",
    "int8_perplexity_abs_change_pct": "<= 2",
}
CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Sizes:
    corpus_bytes: int  # stdlib text read (train + held-out)
    vocab_size: int
    seq_len: int
    train_batch: int
    train_steps: int
    eval_rows: int  # held-out rows of seq_len tokens for perplexity
    decode_batch: int  # serving-like requests: prompts decoded together
    prompt_len: int
    new_tokens: int
    compute_layers: int  # moe_small dims, this many layers
    compute_experts: int  # and this many experts (moe_small: 16)
    compute_batch: int
    compute_seq: int
    compute_decode_batch: int
    compute_new_tokens: int
    pairs: int  # fp32/int8 timing pairs per figure
    sweep: bool  # decode ratios at the sizes bracketing the auto threshold


FULL = Sizes(
    corpus_bytes=3_000_000,
    vocab_size=4096,
    seq_len=128,
    train_batch=16,
    train_steps=240,
    eval_rows=96,
    decode_batch=16,
    prompt_len=32,
    new_tokens=32,
    compute_layers=2,
    compute_experts=16,
    compute_batch=8,
    compute_seq=128,
    compute_decode_batch=16,
    compute_new_tokens=16,
    pairs=7,
    sweep=True,
)
QUICK = Sizes(
    corpus_bytes=200_000,
    vocab_size=512,
    seq_len=64,
    train_batch=8,
    train_steps=6,
    eval_rows=8,
    decode_batch=4,
    prompt_len=8,
    new_tokens=8,
    compute_layers=1,
    compute_experts=4,
    compute_batch=2,
    compute_seq=32,
    compute_decode_batch=4,
    compute_new_tokens=2,
    pairs=2,
    sweep=False,
)
# sizes around AUTO_CPU_MIN_EXPERT_ELEMENTS (dim x ffn_dim = 128K): 72K, 128K, 384K (moe_tiny: 32K)
SWEEP = (
    dict(dim=192, ffn_dim=384, n_heads=4, num_experts=8),
    dict(dim=256, ffn_dim=512, n_heads=4, num_experts=8),
    dict(dim=384, ffn_dim=1024, n_heads=6, num_experts=8),
)


def log(msg: str) -> None:
    print(f"[bench_int8] {msg}", flush=True)


def model_config(name: str, **overrides) -> ModelConfig:
    raw = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    return dataclasses.replace(ModelConfig(**raw), **overrides)


# ------------------------------------------------------------------------------ data + training
def corpus_rows(sizes: Sizes) -> tuple[TextTokenizer, torch.Tensor, torch.Tensor]:
    """Tokenizer trained on the training files; (train rows, held-out rows) [N, seq_len + 1]."""
    docs = list_stdlib(max_files=400, max_bytes=sizes.corpus_bytes, seed=1234)
    n_val = max(1, len(docs) // 10)
    train_docs, val_docs = docs[n_val:], docs[:n_val]
    tokenizer = TextTokenizer.train(
        iter_texts(train_docs, max_bytes=1_000_000), vocab_size=sizes.vocab_size
    )

    def rows(docs_) -> torch.Tensor:
        ids = tokenizer.encode_batch(list(iter_texts(docs_)))
        return torch.from_numpy(pack_rows(ids, tokenizer.eos_id, sizes.seq_len + 1)).long()

    return tokenizer, rows(train_docs), rows(val_docs)


def train(
    cfg: ModelConfig, vocab: int, rows: torch.Tensor, sizes: Sizes
) -> tuple[Transformer, dict[str, float]]:
    """AdamW with the project's warmup + cosine schedule, a fixed number of steps."""
    torch.manual_seed(0)
    model = Transformer(cfg, vocab)
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=True
    )
    steps = sizes.train_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, min(30, steps // 4), steps, 0.1)
    )
    generator = torch.Generator().manual_seed(0)
    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    for step in range(1, steps + 1):
        batch = rows[torch.randint(len(rows), (sizes.train_batch,), generator=generator)]
        logits, aux = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + aux["aux_loss"] + aux["z_loss"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 40 == 0:
            log(
                f"train step {step}/{steps}: loss {statistics.fmean(losses[-40:]):.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    final = statistics.fmean(losses[-20:])
    log(
        f"trained {steps} steps in {seconds:.0f} s ({cpu_seconds:.0f} CPU s), "
        f"final loss {final:.3f}"
    )
    return model.eval(), {
        "train_steps": float(steps),
        "train_s": seconds,
        "train_cpu_s": cpu_seconds,
        "train_loss_final": final,
        "train_tokens": float(steps * sizes.train_batch * sizes.seq_len),
    }


@torch.inference_mode()
def perplexity(model: torch.nn.Module, rows: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        logits, _ = model(chunk[:, :-1])
        total += float(
            F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        )
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


# ------------------------------------------------------------------------------ timing
@dataclasses.dataclass(frozen=True)
class Timed:
    tokens: int
    wall_s: float
    cpu_s: float  # this process's CPU time: the time it actually held a core


def _timed(fn: Callable[[], int]) -> Timed:
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return Timed(tokens, time.perf_counter() - wall, time.process_time() - cpu)


@torch.inference_mode()
def serve_request(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> Timed:
    """A serving-like batch: prefill ``prompts`` [B, P] into a KV cache, then greedy decode."""
    B, P = prompts.shape

    def generate() -> int:
        cache = model.new_cache(B, max_len=P + new_tokens)
        logits, _ = model(prompts, cache, 0)
        for i in range(new_tokens):
            next_tokens = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            if i + 1 < new_tokens:
                logits, _ = model(next_tokens, cache, P + i)
        return B * new_tokens

    return _timed(generate)


@torch.inference_mode()
def prefill(model: torch.nn.Module, tokens: torch.Tensor) -> Timed:
    """One forward over ``tokens`` [B, T] (prompt processing)."""
    return _timed(lambda: (model(tokens), tokens.numel())[1])


def paired(
    fp32: torch.nn.Module,
    int8: torch.nn.Module,
    work: Callable[[torch.nn.Module], Timed],
    pairs: int,
    fused: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Alternate fp32 and int8 runs of ``work``: median tokens/s of each and the median per-pair
    ratio, by wall time (``ratio``) and by this process's CPU time (``cpu_ratio``: what a core of
    its own would give; other processes' load mostly cancels out). With ``fused`` (the int8 path's
    float twin, :func:`fused_float_copy`) it runs in every round too, and ``fused_cpu_ratio`` /
    ``fused_ratio`` are int8 over it: int8's gain without the GEMM fusion."""
    models = {"fp32": fp32, "int8": int8, **({"fused": fused} if fused is not None else {})}
    for model in models.values():
        work(model)  # warm-up: allocator, packed-weight caches
    runs: dict[str, list[Timed]] = {name: [] for name in models}
    for i in range(pairs):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            runs[name].append(work(models[name]))

    def ratios(base: str, attr: str) -> list[float]:
        return [
            i.tokens / getattr(i, attr) / (b.tokens / getattr(b, attr))
            for b, i in zip(runs[base], runs["int8"])
        ]

    wall, cpu = ratios("fp32", "wall_s"), ratios("fp32", "cpu_s")
    out = {
        "ratio": statistics.median(wall),
        "ratio_min": min(wall),
        "ratio_max": max(wall),
        "cpu_ratio": statistics.median(cpu),
        "cpu_ratio_min": min(cpu),
        "cpu_ratio_max": max(cpu),
    }
    if fused is not None:
        fused_cpu = ratios("fused", "cpu_s")
        out.update(
            {
                "fused_ratio": statistics.median(ratios("fused", "wall_s")),
                "fused_cpu_ratio": statistics.median(fused_cpu),
                "fused_cpu_ratio_min": min(fused_cpu),
                "fused_cpu_ratio_max": max(fused_cpu),
            }
        )
    for name, timed in runs.items():
        out[f"{name}_tokens_per_s"] = statistics.median(t.tokens / t.wall_s for t in timed)
        out[f"{name}_tokens_per_cpu_s"] = statistics.median(t.tokens / t.cpu_s for t in timed)
        out[f"{name}_ms"] = 1000 * statistics.median(t.wall_s for t in timed)
    return out


def _figures(prefix: str, result: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{key}": value for key, value in result.items()}


# ------------------------------------------------------------------------------ run
def run(quick: bool = False, threads: int = 1) -> dict[str, float]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    out: dict[str, float] = {
        "quick": float(quick),
        "threads": float(threads),
        "cpu_count": float(os.cpu_count() or 0),
        "load_average_1m_start": os.getloadavg()[0],
    }
    verdicts: list[
        tuple[bool, dict[str, float]]
    ] = []  # (auto picks int8, paired() result) per size

    # 1-2. a trained moe_tiny and its perplexity, fp32 vs int8
    tokenizer, train_rows, val_rows = corpus_rows(sizes)
    log(
        f"corpus: {len(train_rows)} train rows, {len(val_rows)} held-out rows of "
        f"{sizes.seq_len} tokens, "
        f"vocab {tokenizer.vocab_size}"
    )
    tiny_cfg = model_config(
        "moe_tiny", max_seq_len=max(sizes.seq_len, sizes.prompt_len + sizes.new_tokens)
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, train_stats = train(tiny_cfg, tokenizer.vocab_size, train_rows, sizes)
        out.update(train_stats)
        int8, label = quantize_for_inference(model, "int8", CPU)
        eval_rows = val_rows[: sizes.eval_rows]
        ppl_fp32, ppl_int8 = perplexity(model, eval_rows), perplexity(int8, eval_rows)
        change = 100 * (ppl_int8 - ppl_fp32) / ppl_fp32
        agreement = int8_agreement(model, int8, eval_rows[:16])  # logits of the first 16 rows
        out.update(
            {
                "fp32_perplexity": ppl_fp32,
                "int8_perplexity": ppl_int8,
                "int8_perplexity_change_pct": change,
                "int8_perplexity_abs_change_pct": abs(change),
                "int8_rel_logit_error": agreement.rel_logit_error,
                "int8_top1_agreement": agreement.top1_agreement,
                "perplexity_eval_tokens": float(eval_rows[:, 1:].numel()),
            }
        )
        log(
            f"held-out perplexity fp32 {ppl_fp32:.3f}, {label} {ppl_int8:.3f} "
            f"({out['int8_perplexity_change_pct']:+.2f}%)"
        )

        # 3. serving-like requests on the trained moe_tiny
        prompts = val_rows[-sizes.decode_batch :, : sizes.prompt_len]
        tiny = paired(
            model,
            int8,
            lambda m: serve_request(m, prompts, sizes.new_tokens),
            sizes.pairs,
            fused=fused_float_copy(model),
        )
        out.update(_figures("moe_tiny.decode", tiny))
        out.update(
            {
                "int8_vs_fp32_speed_ratio": tiny["cpu_ratio"],
                "int8_vs_fused_fp32_speed_ratio": tiny["fused_cpu_ratio"],
                "moe_tiny.decode_batch": float(sizes.decode_batch),
                "moe_tiny.prompt_len": float(sizes.prompt_len),
                "moe_tiny.new_tokens": float(sizes.new_tokens),
                "moe_tiny.expert_elements": float(tiny_cfg.dim * tiny_cfg.ffn_dim),
                "auto_int8.moe_tiny": float(int8_pays(model, CPU)),
            }
        )
        verdicts.append((int8_pays(model, CPU), tiny))
        log(f"moe_tiny requests b{sizes.decode_batch}: " + _summary(tiny))
        del int8, model

        # 5. the auto threshold's neighbourhood
        for shape in SWEEP if sizes.sweep else ():
            cfg = model_config("moe_tiny", **shape)
            name = f"sweep_d{cfg.dim}_f{cfg.ffn_dim}"
            result = _requests_at(cfg, sizes, out, name)
            verdicts.append((bool(out[f"auto_int8.{name}"]), result))

        # 4. moe_small's layer sizes: prefill (compute-bound) and decode
        small_cfg = model_config(
            "moe_small", n_layers=sizes.compute_layers, num_experts=sizes.compute_experts
        )
        torch.manual_seed(0)
        small = Transformer(small_cfg, sizes.vocab_size).eval()
        small_int8, _ = quantize_for_inference(small, "int8", CPU)
        tokens = torch.randint(
            0,
            sizes.vocab_size,
            (sizes.compute_batch, sizes.compute_seq),
            generator=torch.Generator().manual_seed(1),
        )
        compute = paired(
            small,
            small_int8,
            lambda m: prefill(m, tokens),
            sizes.pairs,
            fused=fused_float_copy(small),
        )
        out.update(_figures("moe_small.prefill", compute))
        out.update(
            {
                "int8_vs_fp32_speed_ratio_compute_bound": compute["cpu_ratio"],
                "int8_vs_fused_fp32_speed_ratio_compute_bound": compute["fused_cpu_ratio"],
                "moe_small.prefill_batch": float(sizes.compute_batch),
                "moe_small.prefill_seq": float(sizes.compute_seq),
                "moe_small.n_layers": float(sizes.compute_layers),
                "moe_small.num_experts": float(sizes.compute_experts),
                "moe_small.expert_elements": float(small_cfg.dim * small_cfg.ffn_dim),
                "auto_int8.moe_small": float(int8_pays(small, CPU)),
            }
        )
        log(
            f"moe_small sizes prefill {sizes.compute_batch}x{sizes.compute_seq}: "
            + _summary(compute)
        )
        prompts = tokens[:, : sizes.prompt_len].repeat(
            math.ceil(sizes.compute_decode_batch / sizes.compute_batch), 1
        )
        prompts = prompts[: sizes.compute_decode_batch]
        decode = paired(
            small,
            small_int8,
            lambda m: serve_request(m, prompts, sizes.compute_new_tokens),
            max(2, sizes.pairs // 2),
        )
        out.update(_figures("moe_small.decode", decode))
        out.update(
            {
                "moe_small.decode_batch": float(sizes.compute_decode_batch),
                "moe_small.new_tokens": float(sizes.compute_new_tokens),
            }
        )
        verdicts.append((int8_pays(small, CPU), decode))
        log(f"moe_small sizes requests b{sizes.compute_decode_batch}: " + _summary(decode))
    finally:
        torch.set_num_threads(previous_threads)

    out.update(
        {
            "auto_threshold_expert_elements": float(AUTO_CPU_MIN_EXPERT_ELEMENTS),
            # "faster"/"slower": every alternated pair agrees (CPU time); else indistinguishable.
            # harmful: auto serves int8 where int8 was slower; missed: float where int8 was faster
            "auto_int8_where_slower": float(
                sum(auto and r["cpu_ratio_max"] < 1 for auto, r in verdicts)
            ),
            "auto_fp32_where_faster": float(
                sum(not auto and r["cpu_ratio_min"] > 1 for auto, r in verdicts)
            ),
            "auto_rule_matches_measurement": float(
                not any(
                    (auto and r["cpu_ratio_max"] < 1) or (not auto and r["cpu_ratio_min"] > 1)
                    for auto, r in verdicts
                )
            ),
            "load_average_1m_end": os.getloadavg()[0],
            "wall_s": time.perf_counter() - t0,
        }
    )
    return out


def _requests_at(
    cfg: ModelConfig, sizes: Sizes, out: dict[str, float], name: str
) -> dict[str, float]:
    """Serving-like requests on a random-weight model of ``cfg``'s sizes (speed does not depend on
    training)."""
    torch.manual_seed(0)
    model = Transformer(cfg, sizes.vocab_size).eval()
    int8, _ = quantize_for_inference(model, "int8", CPU)
    prompts = torch.randint(
        0,
        sizes.vocab_size,
        (sizes.decode_batch, sizes.prompt_len),
        generator=torch.Generator().manual_seed(2),
    )
    result = paired(model, int8, lambda m: serve_request(m, prompts, sizes.new_tokens), sizes.pairs)
    out.update(_figures(f"{name}.decode", result))
    out.update(
        {
            f"{name}.expert_elements": float(cfg.dim * cfg.ffn_dim),
            f"auto_int8.{name}": float(int8_pays(model, CPU)),
        }
    )
    log(
        f"{name} requests b{sizes.decode_batch}: {_summary(result)} "
        f"(auto: {'int8' if int8_pays(model, CPU) else 'fp32'})"
    )
    return result


def _summary(r: dict[str, float]) -> str:
    return (
        f"fp32 {r['fp32_tokens_per_s']:.0f} tok/s, int8 {r['int8_tokens_per_s']:.0f} tok/s; "
        "int8/fp32 "
        f"{r['cpu_ratio']:.2f} by CPU time ({r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f}), "
        f"{r['ratio']:.2f} by wall time ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", dest="json_out", help="write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and budgets: a smoke run for tests"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for the timed work (default 1)"
    )
    args = parser.parse_args(argv)
    figures = run(args.quick, args.threads)
    report = {
        "benchmark": "bench_int8",
        "goals": GOALS,
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        **{k: round(v, 4) for k, v in figures.items()},
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, sort_keys=True))
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "int8_vs_fp32_speed_ratio",
                    "int8_vs_fp32_speed_ratio_compute_bound",
                    "int8_vs_fused_fp32_speed_ratio",
                    "int8_vs_fused_fp32_speed_ratio_compute_bound",
                    "int8_perplexity_change_pct",
                    "int8_perplexity_abs_change_pct",
                    "int8_top1_agreement",
                    "auto_rule_matches_measurement",
                    "load_average_1m_start",
                    "load_average_1m_end",
                )
            },
            indent=2,
        )
    )
    return figures


if __name__ == "__main__":
    main()
