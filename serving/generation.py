"""Batched decoding with a KV cache for requests that each bring their own sampling settings.

One :class:`BatchDecoding` runs the sequences the batcher grouped together: prompts are
left-padded into one prefill (the cache masks the padding and shifts positions, so a
sequence decodes exactly as it would alone), then every step samples one token per live
sequence. Each sequence samples with its own ``torch.Generator`` seeded from the request,
so a seed gives the same text whatever else shares the batch. (``components.model.generate``
decodes a batch with one shared sampling setting; serving needs them per request.)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from components.model.generate import sample_next
from components.model.generate import score as score_tokens
from components.model.quantize import quantize_int8
from serving.text_stream import TextStream


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None


@dataclass
class StepOutput:
    """What one decoding step produced for one sequence."""

    text: str                          # newly final text (may be empty)
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" (EOS or stop sequence) | "length"
    completion_tokens: int = 0


@dataclass
class ScoreResult:
    token_ids: list[int]
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    total_logprob: float
    perplexity: float


def _generator(seed: Optional[int]) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


class Engine:
    """A loaded model (optionally int8-quantised) ready for batched decoding and scoring."""

    def __init__(self, loaded, quantize: str = "none"):
        self.tokenizer = loaded.tokenizer
        model = loaded.model.eval()
        self.model = quantize_int8(model) if quantize == "int8" else model
        self.quantize = quantize
        self.max_seq_len = int(model.cfg.max_seq_len)
        self.eos_id = self.tokenizer.eos_id
        self.pad_id = self.tokenizer.pad_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> "BatchDecoding":
        return BatchDecoding(self, prompts, params)

    def generate(self, prompt: str, params: SamplingParams) -> tuple[str, str, int]:
        """Unbatched convenience (warm-up, in-process benchmark): (text, finish_reason, tokens)."""
        decoding = self.start([self.encode(prompt)], [params])
        text, out = "", None
        while not decoding.done:
            out = decoding.step()[0]
            if out is not None:
                text += out.text
        return text, out.finish_reason, out.completion_tokens

    def score(self, token_ids: list[int]) -> ScoreResult:
        """log p(token_i | tokens_<i) for i >= 1, and the perplexity over those tokens."""
        values = score_tokens(self.model, [list(token_ids)])[0]
        total = float(sum(values))
        perplexity = math.exp(-total / len(values)) if values else float("nan")
        return ScoreResult(
            token_ids=list(token_ids),
            tokens=[self.tokenizer.decode([t]) for t in token_ids],
            token_logprobs=[None, *values],
            total_logprob=total,
            perplexity=perplexity,
        )


@dataclass
class _Sequence:
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator
    generated: int = 0
    finished: bool = False
    finish_reason: Optional[str] = None


class BatchDecoding:
    """Prefill once, then :meth:`step` until :attr:`done`; one output (or None when already finished) per sequence."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
        if not prompts or len(prompts) != len(params):
            raise ValueError(f"need one SamplingParams per prompt, got {len(prompts)} prompts and {len(params)}")
        self.engine = engine
        self.seqs = [_Sequence(p, TextStream(engine.tokenizer, p.stop), _generator(p.seed)) for p in params]
        lengths = [len(ids) for ids in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        prompt_len = max(lengths)
        max_new = max(p.max_tokens for p in params)
        total = prompt_len + max_new
        if total > engine.max_seq_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_new}) exceeds the model's "
                             f"context of {engine.max_seq_len} tokens")
        pad = torch.tensor([prompt_len - n for n in lengths], dtype=torch.long)   # [B]
        tokens = torch.full((len(prompts), prompt_len), engine.pad_id, dtype=torch.long)
        for row, ids in enumerate(prompts):
            tokens[row, prompt_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
        self.prompt_tokens = sum(lengths)
        self.started = time.perf_counter()
        with torch.inference_mode():
            self.cache = engine.model.new_cache(len(prompts), max_len=total, pad=pad)
            logits, _ = engine.model(tokens, self.cache, 0)                          # [B, T, V]
        self.next_logits = logits[:, -1]                                           # [B, V]
        self.pos = prompt_len

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def generated_tokens(self) -> int:
        return sum(s.generated for s in self.seqs)

    @torch.inference_mode()
    def step(self) -> list[Optional[StepOutput]]:
        outputs: list[Optional[StepOutput]] = []
        next_ids = []
        for row, seq in enumerate(self.seqs):
            if seq.finished:
                outputs.append(None)
                next_ids.append(self.engine.pad_id)
                continue
            # per-sequence sampling: its own settings and generator, whatever else is in the batch
            token = int(sample_next(self.next_logits[row:row + 1], seq.params.temperature, seq.params.top_p,
                                    seq.generator)[0])
            next_ids.append(token)
            if token == self.engine.eos_id:
                text, reason = seq.stream.flush(), "stop"
            else:
                seq.generated += 1
                text = seq.stream.push(token)
                reason = "stop" if seq.stream.stopped else ("length" if seq.generated >= seq.params.max_tokens else None)
                if reason == "length":
                    text += seq.stream.flush()
            if reason is not None:
                seq.finished, seq.finish_reason = True, reason
            outputs.append(StepOutput(text=text, finished=seq.finished, finish_reason=seq.finish_reason,
                                      completion_tokens=seq.generated))
        if not self.done:
            tokens = torch.tensor(next_ids, dtype=torch.long)[:, None]              # [B, 1]
            logits, _ = self.engine.model(tokens, self.cache, self.pos)             # [B, 1, V]
            self.next_logits = logits[:, -1]
            self.pos += 1
        return outputs
