"""The chunked cross-entropy equals F.cross_entropy (value and gradient) and keeps no fp32 copy
of bf16 logits for backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.training.loss import chunked_cross_entropy


def _case(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 50, 97, generator=gen) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (3, 50), generator=gen)
    return logits, targets


def test_equals_cross_entropy_and_its_gradient():
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets = _case(dtype)
        ref = F.cross_entropy(logits.float().reshape(-1, 97), targets.reshape(-1))
        (ref_grad,) = torch.autograd.grad(ref, logits)
        loss = chunked_cross_entropy(logits, targets, chunk_rows=32)  # 150 rows: 5 chunks
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.dtype == torch.float32
        assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6), dtype
        assert grad.dtype == dtype
        assert torch.allclose(grad.float(), ref_grad.float(), rtol=1e-5, atol=1e-7), dtype


def test_no_fp32_logits_saved_for_backward():
    logits, targets = _case(torch.bfloat16)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(logits, targets, chunk_rows=32)
    big_fp32 = [n for dtype, n in saved if dtype == torch.float32 and n >= 32 * 97]
    assert big_fp32 == [], saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(logits.float().reshape(-1, 97), targets.reshape(-1))
    assert any(dtype == torch.float32 and n == 150 * 97 for dtype, n in saved)  # what it replaces
