"""Cross-entropy over the vocabulary without a full fp32 copy of the logits kept for backward.

``F.cross_entropy(logits.float(), ...)`` on bf16 logits keeps log-softmax's fp32 ``[N, V]``
output until backward and materialises the fp32 copy of the logits beside it: 128 KB per token
kept and 256 KB at the peak at vocab 32768, more than a whole ``moe_small`` block's activations.
Here the rows are cut into chunks and each chunk's loss is an activation-checkpointed function
of its logits: backward keeps only the logits in their own dtype and recomputes one chunk's fp32
log-softmax at a time. The result and its gradient
equal the unchunked loss (fp32 math in both; tests/unit/training/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 4096
) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., V]`` against ``targets [...]`` (fp32 scalar), in
    chunks of ``chunk_rows`` rows (tokens)."""
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    labels = targets.reshape(-1)  # [N]
    if not flat.requires_grad or flat.shape[0] <= chunk_rows:
        return _chunk_loss(flat, labels) / max(labels.numel(), 1)
    total = flat.new_zeros((), dtype=torch.float32)
    for rows, row_labels in zip(flat.split(chunk_rows), labels.split(chunk_rows)):
        total = total + checkpoint(_chunk_loss, rows, row_labels, use_reentrant=False)
    return total / labels.numel()
