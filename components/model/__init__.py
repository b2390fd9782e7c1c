"""MoE transformer, expert-parallel dispatch, KV-cache generation, export and quantisation.

Everything here is importable and testable without Ray; expert parallelism only needs a
``torch.distributed`` process group.
"""
from components.model.experts import is_expert_param
from components.model.transformer import Transformer, dense_equivalent, model_config, moe_metrics

__all__ = ["Transformer", "dense_equivalent", "is_expert_param", "model_config", "moe_metrics"]
