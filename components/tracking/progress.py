"""Line-based progress for long work: readable in a terminal, in `ray job logs` and in CI logs."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """``[train] 50/200 steps (25%) 3.1 steps/s ETA 0:48 loss=3.21``.

    Prints at most every ``min_interval_s`` seconds (and always at the end) so that slow
    log sinks are not flooded.
    """

    def __init__(
        self, stage: str, total: int, unit: str = "step", min_interval_s: float = 2.0, stream=None
    ):
        self.stage, self.total, self.unit = stage, max(int(total), 1), unit
        self.min_interval_s = min_interval_s
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = time.monotonic()
        self._last_print = 0.0

    def update(self, n: int = 1, **postfix: float | str) -> None:
        self.set(self.done + n, **postfix)

    def set(self, done: int, **postfix: float | str) -> None:
        self.done = min(int(done), self.total)
        now = time.monotonic()
        if self.done < self.total and now - self._last_print < self.min_interval_s:
            return
        self._last_print = now
        self.stream.write(self.line(now, postfix) + "\n")
        self.stream.flush()

    def line(self, now: float, postfix: dict) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = format_duration(eta) if eta != float("inf") else "?"
        extra = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items()
        )
        pct = 100.0 * self.done / self.total
        return (
            f"[{self.stage}] {self.done}/{self.total} {self.unit}s ({pct:.0f}%) "
            f"{rate:.2f} {self.unit}s/s ETA {eta_text} {extra}".rstrip()
        )
