"""The experts of one MoE layer on this rank, stored as batched [num_local_experts, ...] weights.

Two ways to run them over rows already grouped by expert (``counts[e]`` contiguous rows each):

* ``grouped_mm`` — ``torch.nn.functional.grouped_mm``: one kernel per weight matrix for all
  experts, group boundaries read from a device tensor (no host sync). A real grouped GEMM (CUTLASS)
  only for bf16 on SM90/SM100 (Hopper, Blackwell); elsewhere torch falls back to a per-group loop
  that copies the offsets to the host (a sync), and on CPU it runs per group internally.
* ``loop`` — one matmul per expert over its rows (never per token). Needs the counts on the
  host to split the rows.

``model.expert_backend`` picks one; ``auto`` means grouped_mm for CUDA bf16 and the loop
elsewhere. Both give the same outputs and gradients (tests/unit/model/test_experts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.config.schema import ExpertBackend

BACKENDS = tuple(b.value for b in ExpertBackend)  # model.expert_backend's choices


def mark_expert(param: nn.Parameter) -> nn.Parameter:
    """Tag a parameter as expert-sharded: synchronised in its expert-data-parallel group, not by
    DDP."""
    param._moeops_expert = True
    return param


def is_expert_param(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_moeops_expert", False))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether F.grouped_mm can run these shapes at all: its kernels need 16-byte aligned rows."""
    if not hasattr(F, "grouped_mm"):
        return False
    item = torch.empty((), dtype=dtype).element_size()
    return all((d * item) % 16 == 0 for d in dims)


def grouped_mm_is_faster(
    device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None
) -> bool:
    """Where the grouped kernel beats the loop: CUDA bf16 on SM90 / SM100 (``capability`` of the
    GPU),
    the devices torch's CUTLASS grouped GEMM runs on (aten ``_grouped_mm_cuda``'s fast path). Other
    GPUs (e.g. A100, SM80) get torch's fallback: a loop over groups after copying the offsets to
    the host, i.e. our loop plus a sync. On CPU it is a per-group loop inside one op
    (tests/benchmarks/bench_moe.py measures it level with the Python loop)."""
    return (
        device_type == "cuda"
        and dtype == torch.bfloat16
        and capability is not None
        and capability[0] in (9, 10)
    )


class _ContiguousGrad(torch.autograd.Function):
    """Identity on grouped_mm's output whose backward hands grouped_mm a freshly laid out gradient:
    its backward refuses the expanded (stride-0) gradients that e.g. ``out.sum().backward()`` makes
    (``contiguous()`` keeps those strides when the tensor is empty)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.new_empty(grad.shape) if grad.numel() == 0 else grad.contiguous()


class GroupedExperts(nn.Module):
    """SwiGLU experts ``w2(silu(x w1) * x w3)``; tokens arrive grouped by expert.

    ``forward(x [M, D], counts)``: ``counts`` is either a host ``list[int]`` (one int per local
    expert) or a device ``LongTensor [num_local_experts]``; its sum must be M. The dispatcher asks
    :meth:`uses_grouped_mm` first and only reads counts to the host when the loop needs them.
    """

    # Reuse one compute-dtype copy of the weights until they change (see compute_weights). A
    # class attribute, so a test can turn it off to compare with a cast in every call.
    cache_compute_weights: bool = True

    def __init__(self, num_local_experts: int, dim: int, hidden_dim: int, backend: str):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend {backend!r}: must be one of {BACKENDS}")
        self.num_local_experts = num_local_experts
        self.backend = backend
        self.w1 = mark_expert(nn.Parameter(torch.empty(num_local_experts, dim, hidden_dim)))
        self.w3 = mark_expert(nn.Parameter(torch.empty(num_local_experts, dim, hidden_dim)))
        self.w2 = mark_expert(nn.Parameter(torch.empty(num_local_experts, hidden_dim, dim)))
        self._cast: tuple | None = None  # (key, (w1, w3, w2) in the compute dtype)

    def compute_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """w1, w3, w2 in ``dtype``. fp32 weights under bf16 autocast (the DDP path; FSDP2 hands
        the experts over in bf16 already) are cast once and the copy reused for every call until
        the optimizer changes them: every all-to-all chunk and every micro-batch of a step, its
        recompute under activation checkpointing too, instead of one cast (a read of the fp32
        weights and a write of the bf16 copy) per call. The key is the weights' version counters
        (an optimizer step, ``load_state_dict`` or any in-place write bumps them), their storage,
        the dtype and the grad mode (a copy made under ``no_grad`` has no path back to the fp32
        weights). Gradients still reach the fp32 weights: the cast's backward holds no tensors,
        so each micro-batch's backward passes through it and accumulates in ``.grad``."""
        weights = (self.w1, self.w3, self.w2)
        if all(w.dtype == dtype for w in weights):
            return weights
        if not self.cache_compute_weights:
            return tuple(w.to(dtype) for w in weights)
        # Tensor._version (private, on purpose): torch's own count of in-place writes, the one
        # signal that catches every change of the weights; the public optimizer step hooks miss
        # load_state_dict and any other in-place write, which would serve a stale copy.
        key = (
            dtype,
            torch.is_grad_enabled(),
            tuple((w.data_ptr(), w._version) for w in weights),
        )
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, tuple(w.to(dtype) for w in weights))
        return self._cast[1]

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """The backend for this input: ``auto`` resolves per device and compute dtype."""
        dtype = compute_dtype(x)
        dims = tuple(self.w1.shape[1:])
        if self.backend == "loop":
            return False
        if self.backend == "grouped_mm":
            if not grouped_mm_supported(dtype, dims):
                raise ValueError(
                    f"model.expert_backend='grouped_mm' cannot run dim/ffn_dim {dims} in {dtype}: "
                    f"F.grouped_mm needs rows of a multiple of 16 bytes (use 'auto' or 'loop')"
                )
            return True
        capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
        return grouped_mm_is_faster(x.device.type, dtype, capability) and grouped_mm_supported(
            dtype, dims
        )

    def forward(self, x: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(counts, torch.Tensor):
            return self._grouped(x, counts)
        if len(counts) != self.num_local_experts or sum(counts) != x.shape[0]:
            raise ValueError(
                f"counts {counts} do not describe {x.shape[0]} rows over {self.num_local_experts} "
                "experts"
            )
        return self._loop(x, counts)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E_local] end row of each group
        x = x.to(dtype)
        w1, w3, w2 = self.compute_weights(dtype)
        hidden = F.silu(F.grouped_mm(x, w1, offs=offsets)) * F.grouped_mm(
            x, w3, offs=offsets
        )  # [M, F]
        return _ContiguousGrad.apply(F.grouped_mm(hidden, w2, offs=offsets))  # [M, D]

    def _loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs = []
        dtype = compute_dtype(x)
        x = x.to(dtype)
        # unbind once: indexing w[e] per expert would make backward allocate a full-size
        # [E, ...] zero gradient per expert; unbind's backward is a single stack. The weights
        # in the compute dtype (autocast would cast each expert's slice in every call)
        w1, w3, w2 = (w.unbind(0) for w in self.compute_weights(dtype))
        for e, rows in enumerate(torch.split(x, counts)):
            if rows.shape[0] == 0:
                continue
            hidden = F.silu(rows @ w1[e]) * (rows @ w3[e])  # [m, F]
            outputs.append(hidden @ w2[e])  # [m, D]
        if not outputs:
            # no rows at all: keep both x and the weights in the autograd graph. x: under expert
            # parallelism x came out of an all-to-all whose backward must run on every rank (a
            # collective), even on a rank that received nothing. Weights: every rank gets a
            # (zero) gradient for the expert-data-parallel all-reduce.
            anchor = x.sum() + self.w1.sum() + self.w3.sum() + self.w2.sum()
            return x.new_zeros(x.shape, dtype=compute_dtype(x)) + 0.0 * anchor
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
