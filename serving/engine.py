"""Continuous batching: one model version's decode state, stepped one iteration at a time.

An :class:`Engine` owns a model, its tokenizer and a KV cache of ``serve.max_num_seqs``
preallocated slots. Each :meth:`Engine.step` is one iteration of the scheduler (as in vLLM or
Orca):

1. drop aborted sequences (their slots are freed at once);
2. admit waiting sequences into free slots (their prompt tokens, at most
   ``serve.max_num_batched_tokens`` per step, join this iteration's forward);
3. one forward over every running sequence — each row at its own length, decoding rows feed their
   last token, admitted rows their prompt (right-padded; a long prompt runs as a forward of its own
   rather than padding every decoding row to its length);
4. sample one token per row with that row's own settings (``components.model.sampling``);
5. emit each row's new text and retire the finished rows, moving the last live slot into the hole
   so live rows always occupy slots ``0..B-1`` (no gather, no cache rebuilt per batch).

The engine is not thread-safe: :class:`serving.engine_loop.EngineLoop` drives every engine of a
replica from one thread. Warm-up (and unit tests) may step an engine directly before it is shared.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from components.model.generate import score as score_tokens
from components.model.layers import SeqPositions
from components.model.sampling import SamplingParams, process_and_sample, token_logprobs
from serving.text_stream import TextStream, token_bytes_table

log = logging.getLogger("moeops.serving")

# a forward that pads more than this share of its tokens runs the new prompts separately
MAX_PADDING_SHARE = 0.5


@dataclass(frozen=True)
class EngineSettings:
    """What an engine is built with (from ``serve.*``); a change builds and warms new engines."""

    max_num_seqs: int  # KV-cache slots: sequences decoded together
    max_num_batched_tokens: int  # prompt tokens admitted per step

    @classmethod
    def from_serve(cls, serve_cfg: Any) -> EngineSettings:
        """From the typed ``serve`` section (components.config.schema.ServeConfig)."""
        return cls(int(serve_cfg.max_num_seqs), int(serve_cfg.max_num_batched_tokens))


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides one sequence's tokens besides its prompt."""

    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token; None: no logprobs
    seed: int | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely (id, logprob), most likely first


@dataclass
class StepOutput:
    """What one iteration produced for one sequence (the last one has ``finished``)."""

    text: str  # newly final text (may be empty: held back or stop)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: Any | None = None  # the stop string or stop token id that ended it
    completion_tokens: int = 0
    cumulative_logprob: float = 0.0


class Sequence:
    """One prompt being completed. Created by the API side, stepped only by the engine's thread."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        tokenizer,
        sink: Any = None,
        byte_table: list[bytes] | None = None,
        streamed: bool = True,
    ):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink  # where the engine loop delivers StepOutputs (asyncio.Queue)
        # False: nobody reads the outputs before the last one (a non-streamed request), so the
        # engine
        # loop hands them over all at once when the sequence ends instead of waking the event loop
        # every step (see serving/engine_loop.py)
        self.streamed = streamed
        self.held: list[Any] = []  # outputs held back by the engine loop (streamed=False)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.rng = random.Random(seed)
        self.stream = TextStream(
            tokenizer, params.stop, params.include_stop_str_in_output, byte_table
        )
        self.cached = 0  # tokens of this sequence in its KV slot
        self.last_token: int | None = None  # sampled, not yet in the cache
        self.generated = 0
        self.cumulative_logprob = 0.0
        self.finished = False
        self.aborted = False
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def needs_logprobs(self) -> bool:
        return self.params.logprobs is not None


class Engine:
    """A loaded model version with ``max_num_seqs`` KV slots; see the module doc for one step."""

    def __init__(
        self, model: torch.nn.Module, tokenizer, settings: EngineSettings, label: str = ""
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label  # model version, for metrics and logs
        self.max_seq_len = int(model.cfg.max_seq_len)
        self.vocab_size = int(model.vocab_size)
        self.eos_id = tokenizer.eos_id
        self.byte_table = token_bytes_table(tokenizer)
        self.settings = settings
        self.slots = settings.max_num_seqs
        self.token_budget = settings.max_num_batched_tokens
        self.device = model.tok_embeddings.weight.device
        self.cache = model.new_cache(self.slots, max_len=self.max_seq_len)
        self.output_counts = torch.zeros(
            self.slots, self.vocab_size, device=self.device
        )  # [slots, V]
        self.seen = torch.zeros(self.slots, self.vocab_size, dtype=torch.bool, device=self.device)
        self.running: list[Sequence] = []  # running[i] holds KV slot i
        self.waiting: deque[Sequence] = deque()
        self.steps = 0

    # ------------------------------------------------------------------ intake
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def sequence(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        sink: Any = None,
        streamed: bool = True,
    ) -> Sequence:
        """A new sequence for this engine's tokenizer (``sink``: where the engine loop delivers its
        outputs;
        ``streamed=False``: delivered all at once when the sequence ends)."""
        return Sequence(prompt_ids, params, self.tokenizer, sink, self.byte_table, streamed)

    def add(self, seq: Sequence) -> None:
        if len(seq.prompt_ids) + seq.params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) "
                f"exceeds the model's context of {self.max_seq_len} tokens"
            )
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Mark for removal at the start of the next step; True if it was still queued or
        running."""
        if seq.finished or seq.aborted:
            return False
        seq.aborted = True
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ one iteration
    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, StepOutput]]:
        outputs: list[tuple[Sequence, StepOutput]] = []
        self._drop_aborted(outputs)
        new = self._admit()
        if not self.running:
            return outputs
        self.steps += 1
        logits = self._forward(len(self.running) - len(new))  # [B, V]
        tokens, logprobs = self._sample(logits)
        finished: list[int] = []
        token_list = tokens.tolist()
        for row, seq in enumerate(self.running):
            out = self._advance(seq, token_list[row], logprobs.get(row))
            outputs.append((seq, out))
            if out.finished:
                finished.append(row)
        self._retire(finished)
        return outputs

    def _drop_aborted(self, outputs: list[tuple[Sequence, StepOutput]]) -> None:
        if any(s.aborted for s in self.waiting):
            kept = deque(s for s in self.waiting if not s.aborted)
            for seq in self.waiting:
                if seq.aborted:
                    seq.finished = True
                    outputs.append((seq, self._abort_output(seq)))
            self.waiting = kept
        aborted = [row for row, seq in enumerate(self.running) if seq.aborted]
        for row in aborted:
            seq = self.running[row]
            seq.finished = True
            outputs.append((seq, self._abort_output(seq)))
        self._retire(aborted)

    @staticmethod
    def _abort_output(seq: Sequence) -> StepOutput:
        return StepOutput(
            text="",
            finished=True,
            finish_reason="abort",
            completion_tokens=seq.generated,
            cumulative_logprob=seq.cumulative_logprob,
        )

    def _admit(self) -> list[Sequence]:
        new: list[Sequence] = []
        budget = self.token_budget
        while self.waiting and len(self.running) < self.slots:
            seq = self.waiting[0]
            if new and len(seq.prompt_ids) > budget:
                break  # the prompt-token budget of this step is spent; at least one joins per step
            self.waiting.popleft()
            budget -= len(seq.prompt_ids)
            slot = len(self.running)
            self.running.append(seq)
            new.append(seq)
            self.output_counts[slot].zero_()
            if seq.params.sampling.uses_prompt_tokens:
                self.seen[slot].zero_()
                self.seen[slot, torch.tensor(seq.prompt_ids, device=self.device)] = True
        return new

    def _forward(self, decoding: int) -> torch.Tensor:
        """Logits [B, V] of every running row's last real token; rows >= ``decoding`` are new
        prompts."""
        rows = self.running
        lengths = [1] * decoding + [len(s.prompt_ids) for s in rows[decoding:]]
        longest = max(lengths)
        padded = len(rows) * longest
        if decoding and longest > 1 and padded - sum(lengths) > MAX_PADDING_SHARE * padded:
            # decoding rows and new prompts in separate forwards: padding every decoding row to the
            # longest prompt would cost more than the second forward
            return torch.cat(
                [
                    self._run(rows[:decoding], lengths[:decoding], 0),
                    self._run(rows[decoding:], lengths[decoding:], decoding),
                ]
            )
        return self._run(rows, lengths, 0)

    def _run(self, rows: list[Sequence], lengths: list[int], offset: int) -> torch.Tensor:
        T = max(lengths)
        token_rows = []
        for seq in rows:
            ids = seq.prompt_ids if seq.cached == 0 else [seq.last_token]
            token_rows.append(ids + [self.eos_id] * (T - len(ids)) if len(ids) < T else ids)
        tokens = torch.tensor(token_rows, dtype=torch.long, device=self.device)  # [B, T]
        positions = SeqPositions.build(
            [s.cached for s in rows], lengths, self.device, offset=offset
        )
        logits, _ = self.model(tokens, self.cache, positions, last_only=True)  # [B, 1, V]
        for seq, n in zip(rows, lengths):
            seq.cached += n
        return logits[:, 0]

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, TokenLogprob]]:
        rows = self.running
        B = len(rows)
        params = [s.params.sampling for s in rows]
        uniforms = [0.0 if p.greedy else s.rng.random() for s, p in zip(rows, params)]
        banned = [self._banned(s) for s in rows]
        tokens = process_and_sample(
            logits,
            params,
            uniforms,
            output_counts=self.output_counts[:B]
            if any(p.uses_output_counts for p in params)
            else None,
            seen=self.seen[:B] if any(p.uses_prompt_tokens for p in params) else None,
            banned=banned if any(banned) else None,
        )
        self.output_counts[torch.arange(B, device=self.device), tokens] += 1
        if any(p.uses_prompt_tokens for p in params):
            self.seen[torch.arange(B, device=self.device), tokens] = True
        logprobs: dict[int, TokenLogprob] = {}
        wanted = [row for row, s in enumerate(rows) if s.needs_logprobs]
        if wanted:
            top_n = max(rows[row].params.logprobs for row in wanted)
            index = torch.tensor(wanted, device=self.device)
            chosen, top_ids, top_values = token_logprobs(logits[index], tokens[index], top_n)
            chosen, top_ids, top_values = chosen.tolist(), top_ids.tolist(), top_values.tolist()
            for i, row in enumerate(wanted):
                n = rows[row].params.logprobs
                logprobs[row] = TokenLogprob(
                    int(tokens[row]), chosen[i], list(zip(top_ids[i][:n], top_values[i][:n]))
                )
        return tokens, logprobs

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        p = seq.params
        if seq.generated >= p.min_tokens:
            return ()
        return tuple(p.stop_token_ids) + (() if p.ignore_eos else (self.eos_id,))

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        """Record one sampled token; its text, and whether the sequence ends here."""
        p = seq.params
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
        if logprob is not None:
            seq.cumulative_logprob += logprob.logprob
        seq.last_token = token
        finish_reason, stop_reason, token_ids = None, None, [token]
        if token == self.eos_id and not p.ignore_eos:
            text, finish_reason, token_ids = seq.stream.flush(), "stop", []
        elif token in p.stop_token_ids:
            text, finish_reason, stop_reason, token_ids = seq.stream.flush(), "stop", token, []
        else:
            seq.generated += 1
            text = seq.stream.push(token)
            if seq.stream.stopped:
                finish_reason, stop_reason = "stop", seq.stream.stop_hit
            elif seq.generated >= p.max_tokens:
                finish_reason = "length"
                text += seq.stream.flush()
        seq.finished = finish_reason is not None
        return StepOutput(
            text=text,
            token_ids=token_ids,
            logprobs=[logprob] if logprob and token_ids else [],
            finished=seq.finished,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            completion_tokens=seq.generated,
            cumulative_logprob=seq.cumulative_logprob,
        )

    def _retire(self, rows: list[int]) -> None:
        """Free the slots of ``rows``; the last live slot moves into each hole (highest row
        first)."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                moved = self.running[last]
                self.cache.copy_slot(last, row, moved.cached)
                self.output_counts[row] = self.output_counts[last]
                self.seen[row] = self.seen[last]
                self.running[row] = moved
            self.running.pop()

    def fail_all(self) -> list[Sequence]:
        """After a failed step: every sequence ends (the caller reports the error); slots are
        reset."""
        failed = [*self.running, *self.waiting]
        for seq in failed:
            seq.finished = True
        self.running, self.waiting = [], deque()
        return failed

    # ------------------------------------------------------------------ direct use (warm-up, tests,
    # benchmark)
    def run_to_completion(self, seqs: list[Sequence]) -> list[list[StepOutput]]:
        """Decode ``seqs`` to the end on this thread (the engine must not be shared yet)."""
        for seq in seqs:
            self.add(seq)
        results: dict[int, list[StepOutput]] = {id(s): [] for s in seqs}
        while self.has_work:
            for seq, out in self.step():
                results[id(seq)].append(out)
        return [results[id(s)] for s in seqs]

    def prompt_logprobs(self, token_ids: list[int], top_n: int) -> list[TokenLogprob | None]:
        """log p(token_i | tokens_<i) of a prompt (``echo`` with ``logprobs``); the first is
        None."""
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits, _ = self.model(tokens)  # [1, T, V]
        if len(token_ids) < 2:
            return [None]
        chosen, top_ids, top_values = token_logprobs(logits[0, :-1], tokens[0, 1:], top_n)
        entries: list[TokenLogprob | None] = [None]
        for i, token in enumerate(token_ids[1:]):
            entries.append(
                TokenLogprob(
                    token, float(chosen[i]), list(zip(top_ids[i].tolist(), top_values[i].tolist()))
                )
            )
        return entries

    def score(self, token_ids: list[int]) -> list[float]:
        return score_tokens(self.model, [list(token_ids)])[0]
