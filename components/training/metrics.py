"""Training metrics that stay on the device until a logging step reads them all at once.

Per micro-batch nothing leaves the device: losses and the MoE layers' expert counts are added
to device tensors (:class:`IntervalMetrics`), and phase times are CUDA events on a GPU
(:class:`StepTimer`). A logging step makes one all-reduce of one packed tensor and one copy to
the host (``IntervalMetrics.read``), and resolves the events once.

Where a step's time goes: ``data_wait`` (host time blocked on the reader), ``compute`` and
``comm`` (communication the step waits for outside overlapped regions: the expert-gradient
all-reduce, the global grad-norm reduction; DDP's bucketed all-reduce runs inside backward and
only shows up in ``compute`` when it is not hidden). All-to-all times come from the model's
dispatchers (:func:`a2a_seconds`).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from components.training.parallel import ParallelGroups, all_reduce_sum

PHASES = ("data_wait", "compute", "comm")
NAN = float("nan")


class StepTimer:
    """Wall time per phase on CPU; CUDA events on a GPU (no synchronisation until :meth:`read`).

    ``host=True`` phases (waiting for data) are host time on every device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: dict[str, list] = defaultdict(list)

    @contextmanager
    def phase(self, name: str, host: bool = False) -> Iterator[None]:
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.events[name].append((start, end))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began

    def read(self) -> dict[str, float]:
        """``<phase>_s`` summed since the last read (one wait for the GPU's last event), then start over."""
        out = {f"{name}_s": self.seconds.get(name, 0.0) for name in PHASES}
        for name, pairs in self.events.items():
            if pairs:
                pairs[-1][1].synchronize()
                out[f"{name}_s"] = out.get(f"{name}_s", 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        self.seconds = defaultdict(float)
        self.events = defaultdict(list)
        return out


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class IntervalMetrics:
    """Device-side sums of one logging interval.

    Per micro-batch (:meth:`add_micro_batch`): the loss terms (divided by the accumulation
    steps, so a step's sum is its mean) and every MoE layer's expert counts before and after
    capacity. Per optimizer step (:meth:`end_step`): the global grad norm and whether the step
    was skipped. :meth:`read` is a collective: every rank calls it at the same steps.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.step_losses = torch.zeros(3, dtype=torch.float64, device=device)  # ce, aux, z of the current step
        self.last_losses = torch.zeros(3, dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.counts: torch.Tensor | None = None  # [L, E] assignments before capacity
        self.kept: torch.Tensor | None = None    # [L, E] after capacity
        self.steps = 0
        self.skipped = 0

    @torch.no_grad()
    def add_micro_batch(self, ce: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor,
                        counts: Sequence[torch.Tensor], kept: Sequence[torch.Tensor], accum: int) -> None:
        self.step_losses += torch.stack([ce.detach(), aux_loss.detach(), z_loss.detach()]).double() / accum
        if counts:
            c = torch.stack([x.detach() for x in counts]).double()
            k = torch.stack([x.detach() for x in kept]).double()
            self.counts = c if self.counts is None else self.counts + c
            self.kept = k if self.kept is None else self.kept + k

    @torch.no_grad()
    def end_step(self, grad_norm: torch.Tensor, skipped: bool) -> None:
        self.last_losses = self.step_losses
        self.step_losses = torch.zeros_like(self.step_losses)
        self.grad_norm = grad_norm.detach().double()
        self.steps += 1
        self.skipped += int(skipped)

    def read(self, groups: ParallelGroups) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Everything since the last read, averaged / summed over all ranks; then start over.

        Returns (metrics, per-layer global expert counts ``[E]`` on the CPU). One all-reduce,
        one device-to-host copy."""
        parts = [self.last_losses]
        if self.counts is not None:
            parts += [self.counts.reshape(-1), self.kept.reshape(-1)]
        reduced = all_reduce_sum(torch.cat(parts), groups)
        host = torch.cat([reduced, self.grad_norm.view(1)]).cpu()  # the interval's one sync
        ce, aux, z = (host[:3] / groups.world_size).tolist()
        metrics = {"loss": ce, "train_loss": ce, "aux_loss": aux, "z_loss": z, "grad_norm": float(host[-1]),
                   "skipped_steps": float(self.skipped)}
        layer_counts: list[torch.Tensor] = []
        if self.counts is not None:
            L, E = self.counts.shape
            counts = host[3:3 + L * E].view(L, E)
            kept = host[3 + L * E:3 + 2 * L * E].view(L, E)
            metrics.update(expert_load_metrics(counts, kept))
            layer_counts = list(counts.float())
        else:
            metrics.update(expert_load_metrics(None, None))
        self.counts = self.kept = None
        self.steps = self.skipped = 0
        return metrics, layer_counts


def expert_load_metrics(counts: torch.Tensor | None, kept: torch.Tensor | None) -> dict[str, float]:
    """Balance of the router's assignments from ``[L, E]`` counts (before / after capacity).

    ``moe/load_max_over_mean``: busiest expert over the mean expert (1.0 = balanced, E = all on
    one expert), averaged over MoE layers; ``moe/load_cv``: coefficient of variation, averaged;
    ``moe/dropped_fraction``: assignments dropped by capacity over all assignments. NaN without
    MoE layers (a dense model)."""
    if counts is None or counts.numel() == 0:
        return {"moe/load_max_over_mean": NAN, "moe/load_cv": NAN, "moe/dropped_fraction": NAN}
    counts = counts.double()
    mean = counts.mean(dim=1).clamp_min(1e-9)
    total = float(counts.sum())
    return {
        "moe/load_max_over_mean": float((counts.max(dim=1).values / mean).mean()),
        "moe/load_cv": float((counts.std(dim=1, unbiased=False) / mean).mean()),
        "moe/dropped_fraction": (total - float(kept.double().sum())) / total if total > 0 else 0.0,
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


def a2a_seconds(model: torch.nn.Module, reset: bool = True) -> tuple[float, float]:
    """(exposed, total) all-to-all seconds of the model's MoE dispatchers since the last reset
    (``Transformer.comm_times``: CUDA events on a GPU, wall time on gloo; resolving the events is
    a host sync, so call this once per logging interval). ``exposed``: the compute blocked on an
    all-to-all; ``total``: the all-to-alls in flight."""
    if not hasattr(model, "comm_times"):
        return 0.0, NAN
    times = model.comm_times(reset)
    return times.exposed_s, times.total_s


def exposed_fraction(exposed_s: float, total_s: float) -> float:
    """Exposed over total all-to-all time; NaN where the total is not measured (or nothing was sent)."""
    if not math.isfinite(total_s) or total_s <= 0:
        return NAN
    return min(exposed_s / total_s, 1.0)
