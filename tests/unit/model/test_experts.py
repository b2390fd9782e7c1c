"""Grouped GEMM (F.grouped_mm) and the per-expert loop: equal outputs and gradients; backend
selection."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from components.config.schema import ModelConfig
from components.model.experts import GroupedExperts, grouped_mm_is_faster, grouped_mm_supported
from components.model.moe import MoELayer


def _experts(backend: str, dim=16, hidden=32, n=4) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(n, dim, hidden, backend)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.3)
    return experts


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_mm_equals_loop_outputs_and_gradients(dtype, tol):
    loop, grouped = _experts("loop"), _experts("grouped_mm")
    if dtype != torch.float32:
        loop, grouped = loop.to(dtype), grouped.to(dtype)
    counts = [5, 0, 9, 3]  # an empty group in the middle
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    assert not loop.uses_grouped_mm(x) and grouped.uses_grouped_mm(x)
    out_loop = loop(x, counts)
    out_grouped = grouped(x, torch.tensor(counts))  # device counts: no host copy on this path
    assert out_grouped.dtype == dtype
    assert torch.allclose(out_loop.float(), out_grouped.float(), atol=tol, rtol=tol)
    grads_loop = _grads(out_loop, [x, loop.w1, loop.w3, loop.w2])
    grads_grouped = _grads(out_grouped, [x, grouped.w1, grouped.w3, grouped.w2])
    for a, b in zip(grads_loop, grads_grouped):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_grouped_mm_takes_a_plain_sum_backward_and_zero_rows():
    experts = _experts("grouped_mm")
    x = torch.randn(0, 16, requires_grad=True)
    out = experts(x, torch.zeros(4, dtype=torch.long))
    out.sum().backward()  # expanded (stride-0) gradient; no rows at all
    assert out.shape == (0, 16) and experts.w1.grad is not None and torch.all(experts.w1.grad == 0)


@pytest.mark.parametrize("capacity_factor, shared", [(0.5, False), (1.25, True)])
def test_moe_layer_grouped_mm_equals_loop_with_drops_and_router_gradients(capacity_factor, shared):
    def layer(backend):
        torch.manual_seed(0)
        m = MoELayer(
            ModelConfig(
                dim=16,
                ffn_dim=32,
                num_experts=4,
                top_k=2,
                capacity_factor=capacity_factor,
                shared_expert=shared,
                expert_backend=backend,
            )
        ).train()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(std=0.3)
        return m

    loop, grouped = layer("loop"), layer("grouped_mm")
    x = torch.randn(40, 16)
    xl, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_l, stats = loop(xl)
    out_g, _ = grouped(xg)
    if capacity_factor < 1:
        assert stats.dropped_fraction > 0  # dropped rows ride in the last group with a zero gate
    assert torch.allclose(out_l, out_g, atol=1e-5)

    def params(m):
        return [m.experts.w1, m.experts.w2, m.experts.w3, m.router.gate.weight]

    for a, b in zip(_grads(out_l, [xl, *params(loop)]), _grads(out_g, [xg, *params(grouped)])):
        assert torch.allclose(a, b, atol=1e-5)


def test_auto_backend_picks_grouped_mm_only_where_torch_has_the_grouped_kernel():
    assert grouped_mm_is_faster("cuda", torch.bfloat16, (9, 0))  # H100
    assert grouped_mm_is_faster("cuda", torch.bfloat16, (10, 0))  # B200
    assert not grouped_mm_is_faster(
        "cuda", torch.bfloat16, (8, 0)
    )  # A100: torch loops after a host copy
    assert not grouped_mm_is_faster("cuda", torch.bfloat16, (12, 0))
    assert not grouped_mm_is_faster("cuda", torch.float32, (9, 0))
    assert not grouped_mm_is_faster("cpu", torch.bfloat16, None)
    auto = _experts("auto")
    x = torch.randn(3, 16)
    assert not auto.uses_grouped_mm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not auto.uses_grouped_mm(x)  # CPU: the loop, even in bf16
    # alignment: rows must be a multiple of 16 bytes
    assert grouped_mm_supported(torch.float32, (16, 32)) and not grouped_mm_supported(
        torch.float32, (6, 32)
    )
    assert grouped_mm_supported(torch.bfloat16, (8, 24)) and not grouped_mm_supported(
        torch.bfloat16, (12, 24)
    )


def test_forced_grouped_mm_on_unaligned_dims_fails_clearly():
    experts = _experts("grouped_mm", dim=6, hidden=10)
    with pytest.raises(ValueError, match="expert_backend='grouped_mm' cannot run"):
        experts.uses_grouped_mm(torch.randn(3, 6))
    with pytest.raises(ValueError, match="must be one of"):
        GroupedExperts(2, 8, 8, "cutlass")


def test_expert_backend_is_validated_in_the_config():
    from hydra.errors import ConfigCompositionException

    from components.config import load_config

    # a choice of the schema's enum: refused at composition, naming the value and the choices
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["model.expert_backend=cutlass"])
    assert "Invalid value 'cutlass', expected one of [auto, grouped_mm, loop]" in str(
        err.value.__cause__
    )
    assert load_config(["model.expert_backend=loop"]).model.expert_backend == "loop"


class _ExpertCasts(TorchDispatchMode):
    """Counts casts to bf16 of tensors shaped like the expert weights (the copies a bf16 forward
    makes of them)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = set(shapes), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            func is torch.ops.aten._to_copy.default
            and out.dtype == torch.bfloat16
            and tuple(out.shape) in self.shapes
        ):
            self.count += 1
        return out


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_bf16_expert_weights_are_cast_once_per_optimizer_step(backend, monkeypatch):
    """fp32 experts under bf16 autocast (the DDP path), 2 micro-batches per step, 3 steps: the
    bf16 copy is made once per optimizer step (3 weights x 2 layers), not once per micro-batch;
    the losses equal those of a cast in every call (the same bf16 values: bit for bit)."""
    import torch.nn.functional as F

    from components.model.transformer import Transformer

    def run(cache: bool):
        monkeypatch.setattr(GroupedExperts, "cache_compute_weights", cache)
        cfg = ModelConfig(
            dim=32, n_layers=2, n_heads=4, ffn_dim=64, num_experts=4, max_seq_len=32,
            dropless=True, expert_backend=backend,
        )  # fmt: skip
        torch.manual_seed(0)
        model = Transformer(cfg, 64).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        shapes = {tuple(p.shape) for n, p in model.named_parameters() if ".experts." in n}
        data = torch.randint(0, 64, (3, 2, 2, 17), generator=torch.Generator().manual_seed(1))
        losses, casts = [], []
        for step in range(3):
            with _ExpertCasts(shapes) as counted:
                for micro in data[step]:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        logits, _ = model(micro[:, :-1])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())
                    (loss / 2).backward()
                    losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            casts.append(counted.count)
        return losses, casts

    cached_losses, cached_casts = run(True)
    every_call_losses, every_call_casts = run(False)
    assert cached_casts == [6, 6, 6], cached_casts
    assert every_call_casts == [12, 12, 12], every_call_casts
    assert cached_losses == pytest.approx(every_call_losses, rel=1e-6, abs=0)
    assert cached_losses[-1] != cached_losses[0]  # the weights moved: the copy was renewed
