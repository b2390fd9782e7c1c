"""int8 vs fp32 inference on CPU: speed where serving runs (moe_tiny), speed where compute
dominates (moe_small's layer sizes), perplexity of a model trained in this run on real text.

    python tests/benchmarks/bench_int8.py --json bench-int8.json           # full run (~3-4 min)
    python tests/benchmarks/bench_int8.py --quick --json /tmp/int8.json    # smoke run (seconds)

int8 is ``components.model.quantize.quantize_for_inference(model, "int8", cpu)`` (fbgemm dynamic
int8, experts included); fp32 is the same model unquantised. Every speed figure alternates fp32
and int8 runs of the same work and takes the median of the per-pair ratios, so load from other
processes hits both alike. Everything runs on ``--threads`` intra-op threads (default 1: what a
serve replica with ``num_cpus <= 1`` gets; on this shared 2-core machine 2 threads also make
small ops crawl whenever another process holds a core).

1. Train ``moe_tiny`` (conf/model/moe_tiny.yaml) in process on the standard-library corpus
   (components/data/corpus.py) with the project's BPE tokenizer (vocab 4096, as data=stdlib):
   240 steps of 16 x 128 tokens, about 90 CPU-seconds; files are split into train and held-out
   before the tokenizer is trained.
2. ``int8_perplexity_change_pct``: held-out perplexity, int8 over fp32 (goal <= 2).
3. ``int8_vs_fp32_speed_ratio``: the trained moe_tiny serving requests: a batch of held-out
   prompts, prefill then greedy decode with the KV cache, generated tokens/s int8 / fp32.
4. ``int8_vs_fp32_speed_ratio_compute_bound``: moe_small's layer sizes (dim 768, 16 experts of
   ffn 2048, top-2, shared expert; ``n_layers`` cut to 2 to bound memory and time, random
   weights), a prefill forward of ``batch x seq`` tokens, tokens/s int8 / fp32 (goal >= 1.5).
   The same model's decode (memory-bound) is reported too.
5. The "auto" rule (``int8_pays``) against the measurement: decode ratios at two sizes that
   bracket its threshold; ``auto_rule_matches_measurement`` is 1 when auto picks int8 exactly
   where int8 decoded faster.
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
from pathlib import Path
from typing import Callable

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
from components.model.quantize import AUTO_CPU_MIN_EXPERT_ELEMENTS, int8_pays, quantize_for_inference  # noqa: E402
from components.training.optim import lr_factor, param_groups  # noqa: E402

GOALS = {"int8_vs_fp32_speed_ratio_compute_bound": ">= 1.5", "int8_perplexity_change_pct": "<= 2"}
CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Sizes:
    corpus_bytes: int          # stdlib text read (train + held-out)
    vocab_size: int
    seq_len: int
    train_batch: int
    train_steps: int
    eval_rows: int             # held-out rows of seq_len tokens for perplexity
    decode_batch: int          # serving-like requests: prompts decoded together
    prompt_len: int
    new_tokens: int
    compute_layers: int        # moe_small dims, this many layers
    compute_batch: int
    compute_seq: int
    compute_decode_batch: int
    compute_new_tokens: int
    pairs: int                 # fp32/int8 timing pairs per figure
    sweep: bool                # decode ratios at the sizes bracketing the auto threshold


FULL = Sizes(corpus_bytes=3_000_000, vocab_size=4096, seq_len=128, train_batch=16, train_steps=240,
             eval_rows=96, decode_batch=16, prompt_len=32, new_tokens=32,
             compute_layers=2, compute_batch=8, compute_seq=128, compute_decode_batch=16, compute_new_tokens=16,
             pairs=7, sweep=True)
QUICK = Sizes(corpus_bytes=200_000, vocab_size=512, seq_len=64, train_batch=8, train_steps=6,
              eval_rows=8, decode_batch=4, prompt_len=8, new_tokens=8,
              compute_layers=1, compute_batch=2, compute_seq=32, compute_decode_batch=4, compute_new_tokens=2,
              pairs=2, sweep=False)
# decode-ratio sizes around AUTO_CPU_MIN_EXPERT_ELEMENTS (dim x ffn_dim): 128K below, 384K above
SWEEP = (dict(dim=256, ffn_dim=512, n_heads=4, num_experts=8), dict(dim=384, ffn_dim=1024, n_heads=6, num_experts=8))


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
    tokenizer = TextTokenizer.train(iter_texts(train_docs, max_bytes=1_000_000), vocab_size=sizes.vocab_size)

    def rows(docs_) -> torch.Tensor:
        ids = tokenizer.encode_batch(list(iter_texts(docs_)))
        return torch.from_numpy(pack_rows(ids, tokenizer.eos_id, sizes.seq_len + 1)).long()

    return tokenizer, rows(train_docs), rows(val_docs)


def train(cfg: ModelConfig, vocab: int, rows: torch.Tensor, sizes: Sizes) -> tuple[Transformer, dict[str, float]]:
    """AdamW with the project's warmup + cosine schedule, a fixed number of steps."""
    torch.manual_seed(0)
    model = Transformer(cfg, vocab)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=True)
    steps = sizes.train_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, min(30, steps // 4), steps, 0.1))
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
            log(f"train step {step}/{steps}: loss {statistics.fmean(losses[-40:]):.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    final = statistics.fmean(losses[-20:])
    log(f"trained {steps} steps in {seconds:.0f} s ({cpu_seconds:.0f} CPU s), final loss {final:.3f}")
    return model.eval(), {"train_steps": float(steps), "train_s": seconds, "train_cpu_s": cpu_seconds,
                          "train_loss_final": final, "train_tokens": float(steps * sizes.train_batch * sizes.seq_len)}


@torch.inference_mode()
def perplexity(model: torch.nn.Module, rows: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        logits, _ = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


# ------------------------------------------------------------------------------ timing
@torch.inference_mode()
def serve_request(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    """A serving-like batch: prefill ``prompts`` [B, P] into a KV cache, greedy-decode; tokens/s."""
    B, P = prompts.shape
    start = time.perf_counter()
    cache = model.new_cache(B, max_len=P + new_tokens)
    logits, _ = model(prompts, cache, 0)
    for i in range(new_tokens):
        next_tokens = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        if i + 1 < new_tokens:
            logits, _ = model(next_tokens, cache, P + i)
    return B * new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def prefill(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """One forward over ``tokens`` [B, T] (prompt processing); tokens/s."""
    start = time.perf_counter()
    model(tokens)
    return tokens.numel() / (time.perf_counter() - start)


def paired(fp32: torch.nn.Module, int8: torch.nn.Module, work: Callable[[torch.nn.Module], float],
           pairs: int) -> dict[str, float]:
    """Alternate fp32 and int8 runs of ``work`` (returns tokens/s); medians and the median ratio."""
    work(fp32), work(int8)  # warm-up: allocator, packed-weight caches
    speeds = {"fp32": [], "int8": []}
    ratios = []
    for i in range(pairs):
        order = ("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")
        run = {name: work(fp32 if name == "fp32" else int8) for name in order}
        for name, value in run.items():
            speeds[name].append(value)
        ratios.append(run["int8"] / run["fp32"])
    return {"fp32_tokens_per_s": statistics.median(speeds["fp32"]),
            "int8_tokens_per_s": statistics.median(speeds["int8"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def _figures(prefix: str, result: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{key}": value for key, value in result.items()}


# ------------------------------------------------------------------------------ run
def run(quick: bool = False, threads: int = 1) -> dict[str, float]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    out: dict[str, float] = {"quick": float(quick), "threads": float(threads), "cpu_count": float(os.cpu_count() or 0),
                             "load_average_1m_start": os.getloadavg()[0]}
    matches: list[bool] = []

    # 1-2. a trained moe_tiny and its perplexity, fp32 vs int8
    tokenizer, train_rows, val_rows = corpus_rows(sizes)
    log(f"corpus: {len(train_rows)} train rows, {len(val_rows)} held-out rows of {sizes.seq_len} tokens, "
        f"vocab {tokenizer.vocab_size}")
    tiny_cfg = model_config("moe_tiny", max_seq_len=max(sizes.seq_len, sizes.prompt_len + sizes.new_tokens))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, train_stats = train(tiny_cfg, tokenizer.vocab_size, train_rows, sizes)
        out.update(train_stats)
        int8, label = quantize_for_inference(model, "int8", CPU)
        eval_rows = val_rows[:sizes.eval_rows]
        ppl_fp32, ppl_int8 = perplexity(model, eval_rows), perplexity(int8, eval_rows)
        out.update({"fp32_perplexity": ppl_fp32, "int8_perplexity": ppl_int8,
                    "int8_perplexity_change_pct": 100 * (ppl_int8 - ppl_fp32) / ppl_fp32,
                    "perplexity_eval_tokens": float(eval_rows[:, 1:].numel())})
        log(f"held-out perplexity fp32 {ppl_fp32:.3f}, {label} {ppl_int8:.3f} "
            f"({out['int8_perplexity_change_pct']:+.2f}%)")

        # 3. serving-like requests on the trained moe_tiny
        prompts = val_rows[-sizes.decode_batch:, :sizes.prompt_len]
        tiny = paired(model, int8, lambda m: serve_request(m, prompts, sizes.new_tokens), sizes.pairs)
        out.update(_figures("moe_tiny.decode", tiny))
        out.update({"int8_vs_fp32_speed_ratio": tiny["ratio"], "moe_tiny.decode_batch": float(sizes.decode_batch),
                    "moe_tiny.prompt_len": float(sizes.prompt_len), "moe_tiny.new_tokens": float(sizes.new_tokens),
                    "moe_tiny.expert_elements": float(tiny_cfg.dim * tiny_cfg.ffn_dim),
                    "auto_int8.moe_tiny": float(int8_pays(model, CPU))})
        matches.append(int8_pays(model, CPU) == (tiny["ratio"] > 1))
        log(f"moe_tiny decode b{sizes.decode_batch}: fp32 {tiny['fp32_tokens_per_s']:.0f} tok/s, "
            f"int8 {tiny['int8_tokens_per_s']:.0f} tok/s, ratio {tiny['ratio']:.2f}")
        del int8, model

        # 5. decode ratios around the auto threshold (random weights: speed does not depend on training)
        for shape in SWEEP if sizes.sweep else ():
            cfg = model_config("moe_tiny", **shape)
            name = f"sweep_d{cfg.dim}_f{cfg.ffn_dim}"
            ratio = _decode_ratio(cfg, sizes.vocab_size, sizes.decode_batch, sizes.prompt_len, sizes.new_tokens,
                                  sizes.pairs, out, name)
            matches.append(out[f"auto_int8.{name}"] == float(ratio > 1))

        # 4. moe_small's layer sizes: prefill (compute-bound) and decode
        small_cfg = model_config("moe_small", n_layers=sizes.compute_layers)
        torch.manual_seed(0)
        small = Transformer(small_cfg, sizes.vocab_size).eval()
        small_int8, _ = quantize_for_inference(small, "int8", CPU)
        tokens = torch.randint(0, sizes.vocab_size, (sizes.compute_batch, sizes.compute_seq),
                               generator=torch.Generator().manual_seed(1))
        compute = paired(small, small_int8, lambda m: prefill(m, tokens), sizes.pairs)
        out.update(_figures("moe_small.prefill", compute))
        out.update({"int8_vs_fp32_speed_ratio_compute_bound": compute["ratio"],
                    "moe_small.prefill_batch": float(sizes.compute_batch), "moe_small.prefill_seq": float(sizes.compute_seq),
                    "moe_small.n_layers": float(sizes.compute_layers),
                    "moe_small.expert_elements": float(small_cfg.dim * small_cfg.ffn_dim),
                    "auto_int8.moe_small": float(int8_pays(small, CPU))})
        log(f"moe_small sizes prefill {sizes.compute_batch}x{sizes.compute_seq}: fp32 "
            f"{compute['fp32_tokens_per_s']:.0f} tok/s, int8 {compute['int8_tokens_per_s']:.0f} tok/s, "
            f"ratio {compute['ratio']:.2f}")
        prompts = tokens[:, :sizes.prompt_len].repeat(math.ceil(sizes.compute_decode_batch / sizes.compute_batch), 1)
        prompts = prompts[:sizes.compute_decode_batch]
        decode = paired(small, small_int8, lambda m: serve_request(m, prompts, sizes.compute_new_tokens),
                        max(2, sizes.pairs // 2))
        out.update(_figures("moe_small.decode", decode))
        out.update({"moe_small.decode_batch": float(sizes.compute_decode_batch),
                    "moe_small.new_tokens": float(sizes.compute_new_tokens)})
        matches.append(int8_pays(small, CPU) == (decode["ratio"] > 1))
        log(f"moe_small sizes decode b{sizes.compute_decode_batch}: ratio {decode['ratio']:.2f}")
    finally:
        torch.set_num_threads(previous_threads)

    out.update({"auto_threshold_expert_elements": float(AUTO_CPU_MIN_EXPERT_ELEMENTS),
                "auto_rule_matches_measurement": float(all(matches)),
                "load_average_1m_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t0})
    return out


def _decode_ratio(cfg: ModelConfig, vocab: int, batch: int, prompt_len: int, new_tokens: int, pairs: int,
                  out: dict[str, float], name: str) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg, vocab).eval()
    int8, _ = quantize_for_inference(model, "int8", CPU)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(2))
    result = paired(model, int8, lambda m: serve_request(m, prompts, new_tokens), pairs)
    out.update(_figures(f"{name}.decode", result))
    out.update({f"{name}.expert_elements": float(cfg.dim * cfg.ffn_dim), f"auto_int8.{name}": float(int8_pays(model, CPU))})
    log(f"{name} decode b{batch}: ratio {result['ratio']:.2f} (auto: {'int8' if int8_pays(model, CPU) else 'fp32'})")
    return result["ratio"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", dest="json_out", help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets: a smoke run for tests")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for the timed work (default 1)")
    args = parser.parse_args(argv)
    figures = run(args.quick, args.threads)
    report = {"benchmark": "bench_int8", "goals": GOALS, "torch": torch.__version__,
              "quantized_engine": torch.backends.quantized.engine,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine(),
              **{k: round(v, 4) for k, v in figures.items()}}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps({k: report[k] for k in ("int8_vs_fp32_speed_ratio", "int8_vs_fp32_speed_ratio_compute_bound",
                                              "int8_perplexity_change_pct", "auto_rule_matches_measurement",
                                              "load_average_1m_start", "load_average_1m_end")}, indent=2))
    return figures


if __name__ == "__main__":
    main()
