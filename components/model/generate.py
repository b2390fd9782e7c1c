"""Batched KV-cache decoding, sampling and scoring.

Prompts of different lengths are left-padded into one batch; the KV cache masks the padding
keys and shifts positions per sequence, so every sequence decodes exactly as it would alone.
The model runs in eval mode here, where MoE routing is dropless (no capacity), so a sequence's
tokens never depend on the other sequences in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from components.model.transformer import Transformer


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: Transformer) -> torch.device:
    return model.tok_embeddings.weight.device


def _check_tokens(model: Transformer, seqs: Sequence[Sequence[int]], what: str) -> None:
    if not seqs:
        raise ValueError(f"{what}: need at least one sequence")
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"{what}[{i}] is empty: need at least one token")
        bad = [t for t in seq if not 0 <= int(t) < model.vocab_size]
        if bad:
            raise ValueError(
                f"{what}[{i}] has token ids {bad[:5]} outside [0, vocab_size={model.vocab_size})"
            )


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. Greedy at temperature 0; else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalises
        return sorted_ids.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def iter_generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every sequence (``None`` once a sequence has
    produced ``eos_id``). Stops after ``max_new_tokens`` steps or when every sequence is done."""
    _check_tokens(model, prompts, "prompts")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_seq_len={model.cfg.max_seq_len}"
        )
    if max_new_tokens == 0:
        return
    device = _device(model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    B = len(prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    tokens = torch.zeros(B, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    with _eval_mode(model):
        cache = model.new_cache(B, max_len=longest + max_new_tokens, pad=pad)
        logits, _ = model(tokens, cache=cache, start_pos=0)  # [B, L, V]
        pos = longest
        for step in range(max_new_tokens):
            next_tokens = sample_next(logits[:, -1], temperature, top_p, generator)  # [B]
            out: list[int | None] = [
                None if d else int(t) for t, d in zip(next_tokens.tolist(), done.tolist())
            ]
            yield out
            if eos_id is not None:
                done |= next_tokens == eos_id
                if bool(done.all()):
                    return
            if step + 1 == max_new_tokens:
                return
            logits, _ = model(next_tokens[:, None], cache=cache, start_pos=pos)
            pos += 1


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """The new tokens of every prompt (without the prompt; generation stops before ``eos_id``)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step_tokens in iter_generate(
        model, prompts, max_new_tokens, temperature, top_p, seed, eos_id
    ):
        for i, token in enumerate(step_tokens):
            if finished[i] or token is None:
                continue
            if eos_id is not None and token == eos_id:
                finished[i] = True
                continue
            outputs[i].append(token)
    return outputs


def generate_text(
    model: Transformer,
    tokenizer,
    prompts: str | list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str | list[str]:
    """Text in, completions out (a str for a str). Prompts longer than the model's window keep
    their last ``max_seq_len - max_new_tokens`` tokens."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    budget = model.cfg.max_seq_len - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"max_seq_len={model.cfg.max_seq_len}"
        )
    encoded = []
    for text in texts:
        ids = tokenizer.encode(text)[-budget:]
        encoded.append(ids if ids else [tokenizer.eos_id])
    new = generate(model, encoded, max_new_tokens, temperature, top_p, seed, tokenizer.eos_id)
    completions = [tokenizer.decode(ids) for ids in new]
    return completions[0] if single else completions


def score(
    model: Transformer, tokens: torch.Tensor | list[list[int]]
) -> torch.Tensor | list[list[float]]:
    """Log-probability of every token given its prefix.

    ``tokens`` LongTensor [B, T] -> [B, T-1] (log p(tokens[:, t] | tokens[:, :t]) for t >= 1);
    a list of token lists (any lengths) -> a list of float lists, each one shorter than its input.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens shape {tuple(tokens.shape)}: need [B, T] with T >= 2")
        with _eval_mode(model):
            logits, _ = model(tokens.to(_device(model)))
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            return logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
    _check_tokens(model, tokens, "tokens")
    longest = max(len(t) for t in tokens)
    if longest < 2:
        return [[] for _ in tokens]
    # right padding is harmless: causal attention never lets a real token see a later pad
    batch = torch.zeros(len(tokens), longest, dtype=torch.long)
    for i, seq in enumerate(tokens):
        batch[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    per_token = score(model, batch)
    return [per_token[i, : len(seq) - 1].tolist() for i, seq in enumerate(tokens)]
