"""One decoding loop per replica that coalesces the batches ``@serve.batch`` forms.

Serve forms the next batch as soon as the wait timeout passes, even while the previous
one still decodes, so under load it hands over many small batches. Decoding them one
after another would waste the batch dimension; instead every batch is submitted here and
the loop starts its next decode with *all* submissions waiting (up to ``max_batch_size``
sequences). The sequences of one submission always decode together, in lockstep, so the
``@serve.batch`` generator can hand out one output per sequence per step.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from serving.generation import BatchDecoding
from serving.metrics import Timer

log = logging.getLogger("moeops.serving")


@dataclass
class _Submission:
    jobs: list[Any]                    # DecodeJob: served (engine), prompt_ids, params
    outputs: list[asyncio.Queue]       # one queue of StepOutput (or an exception) per job


class DecodeScheduler:
    def __init__(self, max_batch_size: int, on_batch: Optional[Callable[[Any, int, int, float], None]] = None):
        self.max_batch_size = max_batch_size
        self._on_batch = on_batch      # (served, sequences, generated tokens, seconds) -> None
        self._pending: deque[_Submission] = deque()
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def submit(self, jobs: list[Any]) -> list[asyncio.Queue]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        submission = _Submission(jobs, [asyncio.Queue() for _ in jobs])
        self._pending.append(submission)
        self._wake.set()
        return submission.outputs

    def _take(self) -> list[_Submission]:
        """Waiting submissions, oldest first, up to max_batch_size sequences (at least one submission)."""
        taken = [self._pending.popleft()]
        size = len(taken[0].jobs)
        while self._pending and size + len(self._pending[0].jobs) <= self.max_batch_size:
            submission = self._pending.popleft()
            taken.append(submission)
            size += len(submission.jobs)
        return taken

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            taken = self._take()
            try:
                await self._decode(taken)
            except Exception as err:  # a failed batch fails its requests, never the loop
                log.exception("decoding a batch failed")
                for submission in taken:
                    for queue in submission.outputs:
                        queue.put_nowait(err)

    async def _decode(self, taken: list[_Submission]) -> None:
        # a canary round mixes versions: one decoding per engine, stepped together
        groups: dict[int, list[tuple[Any, asyncio.Queue]]] = {}
        for submission in taken:
            for job, queue in zip(submission.jobs, submission.outputs):
                groups.setdefault(id(job.served.engine), []).append((job, queue))
        timer = Timer()
        decodings: list[tuple[BatchDecoding, list[asyncio.Queue], Any]] = []
        for members in groups.values():
            served = members[0][0].served
            decoding = await asyncio.to_thread(served.engine.start, [job.prompt_ids for job, _ in members],
                                               [job.params for job, _ in members])
            decodings.append((decoding, [queue for _, queue in members], served))
        while not all(decoding.done for decoding, _, _ in decodings):
            step_outputs = await asyncio.to_thread(_step_all, [decoding for decoding, _, _ in decodings])
            for (_, queues, _), outputs in zip(decodings, step_outputs):
                for queue, out in zip(queues, outputs):
                    if out is not None:
                        queue.put_nowait(out)
        if self._on_batch is not None:
            for decoding, queues, served in decodings:
                self._on_batch(served, len(queues), decoding.generated_tokens, timer.seconds)


def _step_all(decodings: list[BatchDecoding]) -> list[list[Any]]:
    return [d.step() if not d.done else [None] * len(d.seqs) for d in decodings]
