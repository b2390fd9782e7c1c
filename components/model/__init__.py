"""MoE transformer, expert-parallel dispatch, KV-cache generation, export and quantisation.

Everything here is importable and testable without Ray; expert parallelism only needs a
``torch.distributed`` process group.
"""

from components.model.comm_timing import CommTimes
from components.model.experts import is_expert_param
from components.model.metrics import MoEMetricsAccumulator, moe_metrics
from components.model.transformer import Transformer, dense_equivalent

__all__ = [
    "CommTimes",
    "MoEMetricsAccumulator",
    "Transformer",
    "dense_equivalent",
    "is_expert_param",
    "moe_metrics",
]
