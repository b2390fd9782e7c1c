"""Per-sequence sampling for a batch whose rows each bring their own settings (continuous batching).

Every row of ``logits [B, V]`` is one sequence with its own :class:`SamplingParams`. The order
follows OpenAI's and vLLM's semantics:

1. penalties on the raw logits — ``repetition_penalty`` (tokens of the prompt or the output:
   positive logits divided by it, negative ones multiplied), then OpenAI's
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)`` over the *output* tokens;
2. ``logit_bias`` added (OpenAI: -100 bans a token, +100 all but forces it);
3. banned tokens (``min_tokens`` not reached yet: EOS and the stop token ids) set to -inf;
4. temperature 0 = greedy (argmax of the processed logits); otherwise softmax(logits / T), then
   top-k, top-p (nucleus) and min-p filters, and one draw.

The draw is inverse-transform sampling with one uniform number per row that the caller supplies
(each sequence owns a seeded ``random.Random``), so a seeded sequence samples the same tokens
whatever else shares its batch, and the whole batch is sampled with a few tensor ops.

Log-probabilities reported to clients (``logprobs``) are those of the *raw* model distribution
(``log_softmax`` of the logits before any of the above), as vLLM reports by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling settings; the defaults are OpenAI's (neutral) values."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_output_counts(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_prompt_tokens(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def filters(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_counts: torch.Tensor | None,
    seen: torch.Tensor | None,
) -> torch.Tensor:
    """Repetition, frequency and presence penalties; returns new logits [B, V] (float32).

    ``output_counts [B, V]``: how often each token was generated so far (float);
    ``seen [B, V]`` bool: the token occurs in the prompt or the output (repetition penalty).
    """
    logits = logits.float()
    if seen is not None and any(p.uses_prompt_tokens for p in params):
        rep = logits.new_tensor([p.repetition_penalty for p in params])[:, None]  # [B, 1]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if output_counts is not None and any(p.uses_output_counts for p in params):
        freq = logits.new_tensor([p.frequency_penalty for p in params])[:, None]
        presence = logits.new_tensor([p.presence_penalty for p in params])[:, None]
        logits = logits - freq * output_counts - presence * (output_counts > 0).float()
    return logits


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    rows, ids, values = [], [], []
    for row, p in enumerate(params):
        for token, bias in p.logit_bias:
            rows.append(row)
            ids.append(token)
            values.append(bias)
    if not rows:
        return logits
    logits = logits.clone()
    index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
    logits.index_put_(
        index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True
    )
    return logits


def ban(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """Tokens no row may produce this step (per row: EOS and stop ids before ``min_tokens``)."""
    rows = [row for row, ids in enumerate(banned) for _ in ids]
    if not rows:
        return logits
    ids = [token for token_ids in banned for token in token_ids]
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = (
        float("-inf")
    )
    return logits


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float]
) -> torch.Tensor:
    """Processed logits [B, V] -> next token [B]; ``uniforms[b]`` in [0, 1) drives row b's draw."""
    B, V = logits.shape
    greedy_rows = [p.greedy for p in params]
    if all(greedy_rows):
        return logits.argmax(-1)
    temperature = logits.new_tensor([p.temperature if not p.greedy else 1.0 for p in params])[
        :, None
    ]
    probs = F.softmax(logits / temperature, dim=-1)  # [B, V]
    ids = None
    if any(p.filters for p in params):
        probs, ids = probs.sort(dim=-1, descending=True)  # [B, V] each
        rank = torch.arange(V, device=logits.device)[None, :]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=logits.device)[
            :, None
        ]
        top_p = logits.new_tensor([p.top_p for p in params])[:, None]
        min_p = logits.new_tensor([p.min_p for p in params])[:, None]
        # the most likely token always stays, whatever the filters say
        drop = (
            (rank >= top_k) | (probs.cumsum(-1) - probs >= top_p) | (probs < min_p * probs[:, :1])
        )
        probs = probs.masked_fill(drop & (rank > 0), 0.0)
    cdf = probs.double().cumsum(-1)  # [B, V]
    target = (
        torch.tensor(uniforms, dtype=torch.float64, device=logits.device)[:, None] * cdf[:, -1:]
    )
    index = torch.searchsorted(cdf, target, right=True).clamp(max=V - 1)  # [B, 1]
    drawn = (ids.gather(-1, index) if ids is not None else index).squeeze(-1)
    if not any(greedy_rows):
        return drawn
    greedy = torch.tensor(greedy_rows, device=logits.device)
    return torch.where(greedy, logits.argmax(-1), drawn)


def process_and_sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    uniforms: Sequence[float],
    output_counts: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    banned: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """All steps above for raw logits [B, V] -> next tokens [B]."""
    processed = apply_penalties(logits, params, output_counts, seen)
    processed = apply_logit_bias(processed, params)
    if banned is not None:
        processed = ban(processed, banned)
    return sample(processed, params, uniforms)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-model log-probabilities: of ``tokens [B]`` ([B]) and the ``top_n`` most likely ([B, N]
    ids, values)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if top_n <= 0:
        empty = logp.new_zeros((logp.shape[0], 0))
        return chosen, empty.long(), empty
    values, ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
    return chosen, ids, values
