"""Dynamic int8 quantisation for CPU serving.

Linear layers (attention, dense FFNs, shared experts) go through
``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantised per batch at
run time. The batched 3-D expert weights are not ``nn.Linear``s, so each expert's three
matrices are turned into dynamically quantised linears of their own (same int8 kernels);
the router stays in fp32 (routing decisions are sensitive to small logit changes) and so
does the tied embedding / output projection.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

from components.model.experts import GroupedExperts
from components.model.transformer import Transformer


def _linear_from(weight_in_out: torch.Tensor) -> nn.Linear:
    """An nn.Linear computing x @ W for W [in, out] (nn.Linear stores [out, in])."""
    d_in, d_out = weight_in_out.shape
    linear = nn.Linear(d_in, d_out, bias=False)
    linear.weight.data.copy_(weight_in_out.t())
    return linear


class QuantizedGroupedExperts(nn.Module):
    """Drop-in for GroupedExperts (same ``forward(x, counts)``) with int8 dynamic linears per expert."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.num_local_experts = experts.num_local_experts
        float_experts = nn.ModuleList(
            nn.ModuleDict({
                "w1": _linear_from(experts.w1[e].detach()),
                "w3": _linear_from(experts.w3[e].detach()),
                "w2": _linear_from(experts.w2[e].detach()),
            })
            for e in range(experts.num_local_experts)
        )
        self.experts = quantize_dynamic(float_experts, {nn.Linear}, dtype=torch.qint8)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs = []
        for expert, rows in zip(self.experts, torch.split(x, counts)):
            if rows.shape[0]:
                outputs.append(expert["w2"](F.silu(expert["w1"](rows)) * expert["w3"](rows)))
        return torch.cat(outputs) if outputs else x.new_zeros(x.shape)


def quantize_int8(model: Transformer) -> Transformer:
    """A dynamically int8-quantised copy of ``model`` for CPU inference (the original is untouched)."""
    if model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on CPU; move the model to CPU first")
    quantized = copy.deepcopy(model).eval()
    linear_names = {
        name: default_dynamic_qconfig
        for name, module in quantized.named_modules()
        if isinstance(module, nn.Linear) and ".router." not in f".{name}."
    }
    quantized = quantize_dynamic(quantized, linear_names, dtype=torch.qint8, inplace=True)
    for moe in quantized.moe_layers():
        moe.experts = QuantizedGroupedExperts(moe.experts)
    return quantized
