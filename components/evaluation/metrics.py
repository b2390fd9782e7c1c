"""Held-out figures of one model: loss, perplexity, expert utilisation, generation throughput,
samples.

Every model in a comparison (MoE, dense baseline, champion) is scored on the *same* list of
held-out batches, so the numbers are comparable side by side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from components.config.schema import EvaluateConfig


@dataclass
class ModelEvaluation:
    label: str
    source: str  # where the model came from (run / registry URI)
    kind: str  # "moe" or "dense"
    val_loss: float
    perplexity: float
    tokens_evaluated: int
    params_total: int
    params_active: int
    generation_tokens_per_s: float
    # per MoE layer: tokens routed to each expert over the held-out batches
    expert_counts: list[list[int]] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def headline(self) -> dict[str, float]:
        """The numeric figures compared in the report and logged to MLflow."""
        return {
            "val_loss": self.val_loss,
            "perplexity": self.perplexity,
            "generation_tokens_per_s": self.generation_tokens_per_s,
            "params_total": float(self.params_total),
            "params_active": float(self.params_active),
        }


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module, batches: Sequence[torch.Tensor], device: str | torch.device = "cpu"
) -> tuple[float, int, list[list[int]]]:
    """Token-weighted mean cross-entropy over ``batches`` (each LongTensor[B, T+1]).

    Returns (mean loss, tokens scored, per-layer expert token counts summed over the batches).
    """
    if not batches:
        raise ValueError("held_out_loss: no held-out batches (is the validation split empty?)")
    model.eval()
    total_loss, total_tokens = 0.0, 0
    counts: list[torch.Tensor] = []
    for batch in batches:
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each
        logits, aux = model(inputs)  # [B, T, V]
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += targets.numel()
        for i, layer_counts in enumerate(aux.get("expert_counts", [])):
            layer_counts = layer_counts.detach().to("cpu", torch.long)
            if i < len(counts):
                counts[i] += layer_counts
            else:
                counts.append(layer_counts.clone())
    return total_loss / total_tokens, total_tokens, [c.tolist() for c in counts]


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged model reports inf rather than overflowing."""
    return math.exp(loss) if loss < 700 else float("inf")


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token): the model's own count when it has one (MoE-aware)."""
    num_params = getattr(model, "num_params", None)
    if callable(num_params):
        return num_params(active=False), num_params(active=True)
    total = sum(p.numel() for p in model.parameters())
    return total, total


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def generation_throughput(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> float:
    """New tokens per second of greedy, KV-cached batch generation (no early stop at EOS)."""
    from components.model.generate import generate

    generate(model, [list(prompts[0])], 1, temperature=0.0)  # warm-up: first-call allocations
    new, seconds = timed(generate, model, [list(p) for p in prompts], max_new_tokens, 0.0)
    return sum(len(tokens) for tokens in new) / max(seconds, 1e-9)


def evaluate_model(
    label: str,
    loaded,
    batches: Sequence[torch.Tensor],
    *,
    source: str,
    evaluation: EvaluateConfig,
    device: str | torch.device = "cpu",
) -> ModelEvaluation:
    """All held-out figures of one ``LoadedModel`` (from ``components.model.export.load_export``):
    loss on ``batches``, greedy samples for ``evaluation.prompts`` and generation throughput at
    ``evaluation.throughput_batch_size`` x ``evaluation.max_new_tokens``."""
    from components.model.generate import generate_text

    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = list(evaluation.prompts)
    loss, tokens, expert_counts = held_out_loss(model, batches, device)
    total, active = count_params(model)
    encoded = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts] or [[tokenizer.eos_id]]
    batch = [encoded[i % len(encoded)] for i in range(evaluation.throughput_batch_size)]
    tokens_per_s = generation_throughput(model, batch, evaluation.max_new_tokens)
    completions = (
        generate_text(model, tokenizer, prompts, evaluation.max_new_tokens, temperature=0.0)
        if prompts
        else []
    )
    return ModelEvaluation(
        label=label,
        source=source,
        kind=loaded.model_cfg.kind,
        val_loss=loss,
        perplexity=perplexity(loss),
        tokens_evaluated=tokens,
        params_total=total,
        params_active=active,
        generation_tokens_per_s=tokens_per_s,
        expert_counts=expert_counts,
        samples=dict(zip(prompts, completions)),
    )
