"""How long the expert-parallel all-to-alls take (*total*) and how much of that the compute waited
(*exposed*).

* **total** — from the moment a collective's inputs are ready to its completion, i.e. how long
  it is in flight. With overlap on, most of it runs under other work.
* **exposed** — how long the compute was blocked waiting for it. Only this costs step time.

Why two clocks:

* **gloo (CPU)**: ``work.wait()`` blocks the Python thread, so wall time around it is the exposed
  time; completion is stamped by a callback on the work's future (gloo completes it on its worker
  thread). Both are host wall-clock seconds.
* **NCCL (CUDA)**: ``work.wait()`` returns at once on the host — it only makes the current
  stream wait for NCCL's stream — so host wall time says nothing. Instead CUDA events are
  recorded on the compute stream around the wait (exposed = how long the *stream* stalled) and
  on a side stream that waits for the collective (total). Reading events needs a host sync, so
  they are only resolved when :meth:`CommTimer.read` is called (once per logging interval).
  (``TORCH_NCCL_BLOCKING_WAIT=1`` makes ``work.wait()`` block the host too, which serialises every
  all-to-all and defeats the overlap: leave it unset for training.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

# unresolved CUDA event records kept at most; older ones that have completed are folded in
# without blocking, so a caller that never reads cannot grow memory without bound
MAX_PENDING_EVENTS = 4096


@dataclass
class CommTimes:
    """All-to-all times of one or more MoE layers since the last reset (seconds)."""

    exposed_s: float = 0.0  # compute blocked on all-to-alls (forward + backward)
    total_s: float = 0.0  # all-to-alls in flight (forward + backward)
    forward_exposed_s: float = 0.0
    backward_exposed_s: float = 0.0
    calls: int = 0

    def __add__(self, other: CommTimes) -> CommTimes:
        return CommTimes(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def exposed_fraction(self) -> float:
        """Share of all-to-all time the compute waited for (1.0: nothing hidden)."""
        return self.exposed_s / self.total_s if self.total_s > 0 else 0.0


class _WallClockTimed:
    """One in-flight gloo collective: launch time, completion stamped by the future's callback."""

    __slots__ = ("work", "start", "done", "keep")

    def __init__(self, work, start: float, keep: tuple):
        self.work, self.start, self.done, self.keep = work, start, None, keep
        try:
            work.get_future().then(self._stamp)
        except RuntimeError:  # a backend without futures: completion counts as the end of the wait
            pass

    def _stamp(self, _future) -> None:
        self.done = time.perf_counter()


class _CudaTimed:
    __slots__ = ("work", "start", "done", "keep")

    def __init__(self, work, start, done, keep: tuple):
        self.work, self.start, self.done, self.keep = work, start, done, keep


class CommTimer:
    """Launches and waits for collectives on behalf of one dispatcher, timing both ends.

    ``launch(fn, device, keep)`` runs ``fn()`` (which must issue one collective with
    ``async_op=True`` and return its work) and returns a handle; ``wait(handle, backward)`` makes
    the compute wait for it. ``keep`` holds the collective's tensors until that wait: on CUDA the
    caching allocator may otherwise hand their memory to the compute stream while NCCL still
    reads it.
    """

    def __init__(self):
        self._times = CommTimes()
        self._cuda_pending: list[tuple] = []  # (start, done, wait_start, wait_end, backward)
        self._timing_streams: dict[torch.device, torch.cuda.Stream] = {}

    # ---------------------------------------------------------------- launch / wait
    def launch(self, fn: Callable[[], object], device: torch.device, keep: tuple = ()):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            work = fn()
            done = torch.cuda.Event(enable_timing=True)
            # a side stream that waits for the collective marks its completion without
            # holding up the compute stream
            stream = self._timing_stream(device)
            with torch.cuda.stream(stream):
                work.wait()
                done.record(stream)
            return _CudaTimed(work, start, done, keep)
        start = time.perf_counter()
        work = fn()
        return _WallClockTimed(work, start, keep)

    def wait(self, timed, backward: bool = False) -> None:
        if isinstance(timed, _CudaTimed):
            wait_start = torch.cuda.Event(enable_timing=True)
            wait_end = torch.cuda.Event(enable_timing=True)
            wait_start.record()
            timed.work.wait()  # the compute stream waits; the host does not
            wait_end.record()
            self._cuda_pending.append((timed.start, timed.done, wait_start, wait_end, backward))
            if len(self._cuda_pending) > MAX_PENDING_EVENTS:
                self._fold_completed()
        else:
            wait_start = time.perf_counter()
            timed.work.wait()
            wait_end = time.perf_counter()
            # the callback may not have run yet when wait() returns: completion was no later
            done = min(timed.done, wait_end) if timed.done is not None else wait_end
            self._add(wait_end - wait_start, max(done - timed.start, 0.0), backward)
        timed.work = timed.keep = None

    # ------------------------------------------------------------------- reading
    def read(self, reset: bool = False) -> CommTimes:
        """Times so far; resolves pending CUDA events (a host sync: call once per logging
        interval)."""
        for record in self._cuda_pending:
            self._add_cuda(record)
        self._cuda_pending.clear()
        out = CommTimes(**{f.name: getattr(self._times, f.name) for f in fields(CommTimes)})
        if reset:
            self._times = CommTimes()
        return out

    # ------------------------------------------------------------------- helpers
    def _add(self, exposed: float, total: float, backward: bool) -> None:
        t = self._times
        t.exposed_s += exposed
        t.total_s += max(total, exposed)
        if backward:
            t.backward_exposed_s += exposed
        else:
            t.forward_exposed_s += exposed
        t.calls += 1

    def _add_cuda(self, record) -> None:
        start, done, wait_start, wait_end, backward = record
        wait_end.synchronize()
        done.synchronize()
        self._add(wait_start.elapsed_time(wait_end) / 1e3, start.elapsed_time(done) / 1e3, backward)

    def _fold_completed(self) -> None:
        keep = []
        for record in self._cuda_pending:
            if record[1].query() and record[3].query():
                self._add_cuda(record)
            else:
                keep.append(record)
        self._cuda_pending = keep

    def _timing_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._timing_streams:
            self._timing_streams[device] = torch.cuda.Stream(device=device)
        return self._timing_streams[device]
