"""MoE routing metrics for logging: expert load, dropped fraction, auxiliary losses.

``MoEMetricsAccumulator`` is the training-loop API: ``add(aux)`` after every forward only adds
device tensors (no host sync); ``read(group)`` once per logging interval does one all-reduce of
one packed buffer and one device -> host copy. ``moe_metrics(aux)`` flattens a single forward's
``aux`` directly (a host sync per value: fine for evaluation and tests, not for a training step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from components.model.host_sync import documented_sync

HEAD = ("forwards", "aux_loss", "z_loss")  # scalars at the front of the packed buffer


class MoEMetricsAccumulator:
    """Sums per-layer expert counts (before / after capacity) and the weighted auxiliary losses of
    every forward on the device; :meth:`read` turns them into interval metrics.

    Feed it the ``aux`` of training forwards only (not evaluation): counts are this rank's tokens,
    and ``read(group=...)`` sums them over the ranks of ``group`` (the whole world for global load).
    """

    def __init__(self):
        self._sums: torch.Tensor | None = None  # float64 [3 + 2 * L * E] on the counts' device
        self._shape: tuple[int, int] = (0, 0)  # (MoE layers L, experts E)

    def add(self, aux: Mapping[str, Any]) -> None:
        counts = aux.get("expert_counts") or []
        if not counts:
            return
        counts_le = torch.stack([c.detach() for c in counts])  # [L, E]
        kept_le = torch.stack([c.detach() for c in aux["kept_counts"]])  # [L, E]
        head = torch.stack(
            [
                torch.ones((), device=counts_le.device, dtype=torch.float64),
                aux["aux_loss"].detach().to(counts_le.device, torch.float64),
                aux["z_loss"].detach().to(counts_le.device, torch.float64),
            ]
        )
        packed = torch.cat([head, counts_le.reshape(-1).double(), kept_le.reshape(-1).double()])
        if self._sums is None or self._sums.shape != packed.shape:
            self._sums, self._shape = packed, tuple(counts_le.shape)
        else:
            self._sums.add_(packed)

    def reset(self) -> None:
        self._sums = None

    def read(self, group=None, reset: bool = True, prefix: str = "moe/") -> dict[str, float]:
        """Interval metrics (empty before any ``add``). With a process ``group`` (e.g.
        ``dist.group.WORLD``) counts and losses are summed over its ranks first — a collective:
        every rank of the group calls ``read`` at the same point. Without one, this rank's own."""
        if self._sums is None:
            return {}
        sums = self._sums.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        with documented_sync("interval_metrics", sums.device):  # the one host sync of the interval
            values = sums.tolist()
        if reset:
            self.reset()
        L, E = self._shape
        forwards, aux_loss, z_loss = values[:3]
        counts = values[3 : 3 + L * E]
        kept = values[3 + L * E :]
        out: dict[str, float] = {
            f"{prefix}forwards": forwards,
            f"{prefix}aux_loss": aux_loss / max(forwards, 1.0),
            f"{prefix}z_loss": z_loss / max(forwards, 1.0),
        }
        layer_metrics = [
            _layer_metrics(counts[i * E : (i + 1) * E], kept[i * E : (i + 1) * E]) for i in range(L)
        ]
        for i, layer in enumerate(layer_metrics):
            out.update({f"{prefix}layer{i}/{key}": value for key, value in layer.items()})
        for key in ("dropped_fraction", "max_over_mean_load"):
            out[f"{prefix}{key}"] = sum(m[key] for m in layer_metrics) / L
        return out


def _layer_metrics(counts: list[float], kept: list[float]) -> dict[str, float]:
    total = max(sum(counts), 1.0)
    mean = sum(counts) / len(counts)
    out = {
        "dropped_fraction": (sum(counts) - sum(kept)) / total,
        "max_over_mean_load": max(counts) / mean if mean > 0 else 0.0,
    }
    out.update({f"tokens_expert{e}": float(c) for e, c in enumerate(counts)})
    return out


def moe_metrics(aux: Mapping[str, Any], prefix: str = "moe/") -> dict[str, float]:
    """Flat float metrics from one forward's ``aux``: per-layer tokens per expert, dropped fraction,
    max/mean load, their means over layers, and the auxiliary losses."""
    acc = MoEMetricsAccumulator()
    acc.add(aux)
    out = acc.read(prefix=prefix)
    out.pop(f"{prefix}forwards", None)
    for key in ("aux_loss", "z_loss"):
        if key in aux:
            out[f"{prefix}{key}"] = float(torch.as_tensor(aux[key]).detach())
    return out
