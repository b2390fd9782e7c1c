"""Training metrics that stay on the device until a logging step reads them all at once.

Per micro-batch nothing leaves the device: losses and the MoE layers' expert counts are added
to device tensors (:class:`IntervalMetrics`), and phase times are CUDA events on a GPU
(:class:`StepTimer`). A logging (or evaluation) step reads them all at once
(``IntervalMetrics.read``: two small all-reduces, two copies to the host) and resolves the events.

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
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from components.model.host_sync import documented_sync
from components.model.metrics import MoEMetricsAccumulator
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
        """``<phase>_s`` summed since the last read (one wait for the GPU's last event), then start
        over."""
        out = {f"{name}_s": self.seconds.get(name, 0.0) for name in PHASES}
        for name, pairs in self.events.items():
            if pairs:
                pairs[-1][1].synchronize()
                out[f"{name}_s"] = (
                    out.get(f"{name}_s", 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
                )
        self.seconds = defaultdict(float)
        self.events = defaultdict(list)
        return out


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class IntervalMetrics:
    """Device-side sums of one logging interval.

    Per micro-batch (:meth:`add_micro_batch`): the loss terms (divided by the accumulation steps,
    so a step's sum is its mean) and the forward's routing, which goes to the model's
    :class:`~components.model.metrics.MoEMetricsAccumulator` (expert counts before and after
    capacity, per layer). Per optimizer step (:meth:`end_step`): the global grad norm and whether
    the step was skipped. :meth:`read` is a collective: every rank calls it at the same steps.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.step_losses = torch.zeros(
            3, dtype=torch.float64, device=device
        )  # ce, aux, z of the current step
        self.last_losses = torch.zeros(3, dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.moe = MoEMetricsAccumulator()
        self.skipped = 0

    @torch.no_grad()
    def add_micro_batch(self, ce: torch.Tensor, aux: dict, accum: int) -> None:
        self.step_losses += (
            torch.stack([ce.detach(), aux["aux_loss"].detach(), aux["z_loss"].detach()]).double()
            / accum
        )
        self.moe.add(aux)

    @torch.no_grad()
    def end_step(self, grad_norm: torch.Tensor, skipped: bool) -> None:
        self.last_losses = self.step_losses
        self.step_losses = torch.zeros_like(self.step_losses)
        self.grad_norm = grad_norm.detach().double()
        self.skipped += int(skipped)

    def read(self, groups: ParallelGroups) -> tuple[dict[str, float], list[list[float]]]:
        """Everything since the last read, over all ranks; then start over. Returns (metrics,
        per-layer global expert counts). Two small all-reduces and two device-to-host copies
        (the last step's losses and grad norm; the interval's routing)."""
        reduced = all_reduce_sum(self.last_losses, groups)
        with documented_sync("interval_metrics", reduced.device):
            host = torch.cat([reduced, self.grad_norm.view(1)]).cpu()
        ce, aux, z = (host[:3] / groups.world_size).tolist()
        metrics = {
            "loss": ce,
            "train_loss": ce,
            "aux_loss": aux,
            "z_loss": z,
            "grad_norm": float(host[3]),
            "skipped_steps": float(self.skipped),
        }
        self.skipped = 0
        routing = self.moe.read(group=dist.group.WORLD if groups.distributed else None)
        metrics.update(moe_interval_metrics(routing))
        return metrics, layer_counts(routing)


def moe_interval_metrics(routing: dict[str, float]) -> dict[str, float]:
    """The interval's routing figures under their training names (NaN without MoE layers):
    ``moe/load_max_over_mean`` (busiest expert over the mean, averaged over layers; 1.0 =
    balanced), ``moe/dropped_fraction`` (assignments dropped by capacity), and both per layer."""
    out = {
        "moe/load_max_over_mean": routing.get("moe/max_over_mean_load", NAN),
        "moe/dropped_fraction": routing.get("moe/dropped_fraction", NAN),
    }
    for key, value in routing.items():
        if key.startswith("moe/layer") and not key.rsplit("/", 1)[-1].startswith("tokens_expert"):
            out[key] = value
    return out


def layer_counts(routing: dict[str, float]) -> list[list[float]]:
    """``[[tokens of expert 0, 1, ...] per MoE layer]`` from ``MoEMetricsAccumulator.read``."""
    layers: dict[int, dict[int, float]] = {}
    for key, value in routing.items():
        parts = key.split("/")
        if (
            len(parts) == 3
            and parts[1].startswith("layer")
            and parts[2].startswith("tokens_expert")
        ):
            layers.setdefault(int(parts[1][5:]), {})[int(parts[2][13:])] = value
    return [[experts[e] for e in sorted(experts)] for _, experts in sorted(layers.items())]


def expert_fractions(counts: list[list[float]]) -> dict[str, float]:
    """``expert_frac/l<layer>/e<expert>``: each expert's share of its layer's assignments."""
    out = {}
    for layer, row in enumerate(counts):
        total = max(sum(row), 1e-9)
        for expert, value in enumerate(row):
            out[f"expert_frac/l{layer}/e{expert}"] = value / total
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
    """Exposed over total all-to-all time; NaN where the total is not measured (or nothing was
    sent)."""
    if not math.isfinite(total_s) or total_s <= 0:
        return NAN
    return min(exposed_s / total_s, 1.0)
