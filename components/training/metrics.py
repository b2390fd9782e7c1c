"""Where a training step's time goes: waiting for data, computing, and communication left exposed.

``exposed`` communication is only what the step waits for outside overlapped regions (the
expert-gradient all-reduce, the global grad-norm reduction, metric reductions, plus the
all-to-all waits the model reports); DDP's bucketed all-reduce runs inside backward and only
shows up in ``compute`` when it is not hidden.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

PHASES = ("data_wait", "compute", "comm")


class StepTimer:
    """Accumulates wall time per phase between :meth:`reset` calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.started = time.perf_counter()

    def _sync(self) -> None:
        # CUDA kernels run asynchronously: without a sync the time lands in the next phase.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def reset(self) -> dict[str, float]:
        """Times since the last reset (``<phase>_s`` and ``step_time_s``), then start over."""
        now = time.perf_counter()
        out = {f"{name}_s": self.seconds.get(name, 0.0) for name in PHASES}
        out["step_time_s"] = now - self.started
        self.seconds = defaultdict(float)
        self.started = now
        return out


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def expert_load_metrics(expert_counts: list[torch.Tensor]) -> dict[str, float]:
    """Balance of the router's assignments, from per-layer token counts per expert ``[E]``.

    ``expert_load_max`` is the busiest expert's share relative to a perfectly even split
    (1.0 = balanced, E = everything on one expert), averaged over MoE layers;
    ``expert_load_cv`` the coefficient of variation of the counts.
    """
    if not expert_counts:
        return {}
    max_ratios, cvs = [], []
    for counts in expert_counts:
        counts = counts.detach().float().cpu()
        mean = counts.mean().clamp_min(1e-9)
        max_ratios.append(float(counts.max() / mean))
        cvs.append(float(counts.std(unbiased=False) / mean))
    return {
        "expert_load_max": sum(max_ratios) / len(max_ratios),
        "expert_load_cv": sum(cvs) / len(cvs),
    }


def expert_fractions(expert_counts: list[torch.Tensor]) -> dict[str, float]:
    """``expert_frac/l<layer>/e<expert>``: each expert's share of its layer's assignments."""
    out = {}
    for layer, counts in enumerate(expert_counts):
        counts = counts.detach().float().cpu()
        total = counts.sum().clamp_min(1e-9)
        for expert, value in enumerate(counts / total):
            out[f"expert_frac/l{layer}/e{expert}"] = float(value)
    return out
