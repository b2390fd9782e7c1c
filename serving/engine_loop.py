"""The replica's engine loop: one thread that steps every model version's engine, iteration by
iteration.

Requests reach it from the event loop through :meth:`EngineLoop.submit` (a thread-safe command
list; no thread hop per step). Each iteration applies new sequences and aborts, steps each engine
that has work (a canary replica steps the champion's and the challenger's engines side by side)
and hands that iteration's outputs to the event loop with one ``call_soon_threadsafe``, which
puts each into its sequence's own ``asyncio.Queue``. A non-streamed sequence's outputs are held on
the loop thread and handed over together when it ends: nobody reads them earlier.

Backpressure: at most ``serve.max_queued_sequences`` sequences wait for a KV slot across the
replica; :meth:`submit` raises :class:`QueueFull` beyond that (the API answers 429 with
``Retry-After``), so an overloaded replica sheds load early and stays ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from serving.engine import Engine, Sequence, StepOutput

log = logging.getLogger("moeops.serving")


class QueueFull(Exception):
    def __init__(self, queued: int, limit: int):
        super().__init__(
            f"{queued} sequences already wait for a decoding slot "
            f"(serve.max_queued_sequences={limit})"
        )
        self.queued, self.limit = queued, limit


class EngineFailed(Exception):
    """A step raised: the sequences of that engine end with this error (the replica keeps
    serving)."""


class EngineLoop:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_queued: int, metrics: Any = None):
        self._loop = loop
        self.max_queued = max_queued
        self.metrics = metrics  # serving.metrics.ServeMetrics (engine-side hooks)
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Any, Any]] = []
        self._pending = 0  # submitted, not yet handed to an engine
        self._waiting = 0  # in engines' queues, as of the last iteration
        self._engines: list[Engine] = []  # engines with work (this thread only)
        self._closed = False
        self._last_step_at: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="moeops-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    def submit(self, engine: Engine, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (each with an ``asyncio.Queue`` sink) on ``engine``; :class:`QueueFull`
        when full.

        An empty queue always takes a request, so one request larger than the limit still runs.
        """
        with self._cond:
            queued = self._pending + self._waiting
            if queued and queued + len(seqs) > self.max_queued:
                raise QueueFull(queued, self.max_queued)
            self._pending += len(seqs)
            self._commands.append(("add", engine, seqs))
            self._cond.notify()

    def abort(self, engine: Engine, seqs: list[Sequence]) -> None:
        """Stop ``seqs`` (client gone): done at the start of the next iteration, slots freed."""
        pending = [s for s in seqs if not s.finished]
        if pending:
            with self._cond:
                self._commands.append(("abort", engine, pending))
                self._cond.notify()

    async def call(self, engine: Engine, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the loop thread between two iterations (scoring, prompt
        logprobs)."""
        future = self._loop.create_future()
        with self._cond:
            self._commands.append(("call", engine, (fn, future)))
            self._cond.notify()
        return await future

    @property
    def queued(self) -> int:
        return self._pending + self._waiting

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._engines and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                commands, self._commands = self._commands, []
            outputs: list[tuple[Sequence, Any]] = []
            for kind, engine, payload in commands:
                self._apply(kind, engine, payload, outputs)
            for engine in list(self._engines):
                if not engine.has_work:
                    self._engines.remove(engine)
                    continue
                outputs.extend(self._step(engine))
            self._account()
            outputs = _due(outputs)
            if outputs:
                try:
                    self._loop.call_soon_threadsafe(_deliver, outputs)
                except RuntimeError:  # the event loop is gone: the replica is shutting down
                    return

    def _apply(self, kind: str, engine: Engine, payload: Any, outputs: list) -> None:
        if kind == "add":
            with (
                self._cond
            ):  # from pending straight to waiting: the queue never looks emptier than it is
                self._pending -= len(payload)
                self._waiting += len(payload)
            for seq in payload:
                try:
                    engine.add(seq)
                except Exception as err:  # a bad sequence fails alone
                    seq.finished = True
                    outputs.append((seq, err))
            if engine not in self._engines:
                self._engines.append(engine)
        elif kind == "abort":
            for seq in payload:
                engine.abort(seq)
        elif kind == "call":
            fn, future = payload
            try:
                result, error = fn(engine), None
            except Exception as err:
                result, error = None, err
            try:
                self._loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop is gone
                pass

    def _step(self, engine: Engine) -> list[tuple[Sequence, Any]]:
        started = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as err:
            log.exception(
                "engine step failed (%s); its %d sequences end with the error",
                engine.label,
                len(engine.running) + len(engine.waiting),
            )
            failed = engine.fail_all()
            error = EngineFailed(f"generation failed: {type(err).__name__}: {err}")
            return [(seq, error) for seq in failed]
        if self.metrics is not None:
            now = time.perf_counter()
            previous = self._last_step_at.get(id(engine))
            # the gap between two steps is every running sequence's inter-token latency
            gap = now - previous if previous is not None and now - previous < 1.0 else now - started
            self._last_step_at[id(engine)] = now
            self.metrics.observe_step(engine.label, outputs, gap, len(engine.running), now)
        return outputs

    def _account(self) -> None:
        waiting = sum(len(e.waiting) for e in self._engines)
        with self._cond:
            self._waiting = waiting
        if self.metrics is not None:
            per_version: dict[str, tuple[int, int]] = {}
            for e in self._engines:  # an old and a new engine of one version (a resize) add up
                w, r = per_version.get(e.label, (0, 0))
                per_version[e.label] = (w + len(e.waiting), r + len(e.running))
            self.metrics.set_queue(per_version)


def _due(outputs: list[tuple[Sequence, Any]]) -> list[tuple[Sequence, Any]]:
    """What to hand to the event loop now: every output of a streamed sequence; a non-streamed one's
    only when it ends (an error, or its last output), all at once. A non-streamed request then costs
    the event loop one wake-up instead of one per decode step, which it would otherwise spend
    taking the GIL from the engine thread."""
    due = []
    for seq, out in outputs:
        if seq.streamed:
            due.append((seq, out))
        elif isinstance(out, BaseException) or out.finished:
            due.extend((seq, held) for held in seq.held)
            seq.held = []
            due.append((seq, out))
        else:
            seq.held.append(out)
    return due


def _deliver(outputs: list[tuple[Sequence, Any]]) -> None:
    for seq, out in outputs:
        if seq.sink is not None:
            seq.sink.put_nowait(out)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["EngineLoop", "EngineFailed", "QueueFull", "StepOutput"]
