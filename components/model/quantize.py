"""int8 inference: one entry point, the int8 path of each device picked by measurement.

``quantize_for_inference(model, mode, device)`` returns the model to serve and a label of what
was applied. Paths (figures and the machine in docs/quantization.md, measured by
tests/benchmarks/bench_int8.py):

* CPU: fbgemm dynamic int8 (int8 weights per output channel, activations quantised per batch
  at run time) through ``torch.ao.quantization.quantize_dynamic``. That API is deprecated
  but is still the fastest int8 GEMM torch offers on CPU (torchao 0.18's int8 configs ran
  0.05x / 0.71x fp32 on this machine, ``torch._weight_int8pack_mm`` 0.02x-0.2x), so it stays,
  behind :func:`fbgemm_dynamic_int8` only, its DeprecationWarning shown.
* CUDA: torchao's ``Int8WeightOnlyConfig`` (an optional extra, imported only here).

The batched expert weights ``[num_local_experts, ...]`` are not ``nn.Linear``s, and both int8
backends quantise ``nn.Linear``s; so the experts are first rebuilt as :class:`ExpertLinears`
(one fused ``[w1 | w3]`` linear and one ``w2`` linear per expert), which the backend then
quantises with everything else. The router stays in float (a small logit change flips a
routing decision) and so does the embedding lookup; the output projection is quantised.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from components.config.schema import Quantize
from components.model.experts import GroupedExperts

QUANTIZE_MODES = tuple(q.value for q in Quantize)  # serve.quantize's choices

# "auto" on CPU quantises only models whose expert FFN matrices have at least this many elements
# (dim x ffn_dim): the smallest size where fbgemm int8 measured faster than fp32; at moe_tiny's
# 32K the per-call cost of quantising activations eats the cheaper GEMM (docs/quantization.md).
AUTO_CPU_MIN_EXPERT_ELEMENTS = 128 * 1024

_FLOAT_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ExpertLinears(nn.Module):
    """:class:`GroupedExperts` rebuilt as ``nn.Linear`` pairs per expert, for int8 inference.

    Same ``forward(x, counts)``: x [M, D] grouped by local expert, counts[e] rows each -> [M, D].
    ``w13[e]``: D -> 2F (gate and up projections fused into one GEMM), ``w2[e]``: F -> D.
    """

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        w1, w3, w2 = (
            experts.w1.detach(),
            experts.w3.detach(),
            experts.w2.detach(),
        )  # [E, D, F] x2, [E, F, D]
        num_experts, dim, hidden = w1.shape
        self.num_local_experts = num_experts
        self.w13 = nn.ModuleList(
            _linear(torch.cat([w1[e], w3[e]], dim=1)) for e in range(num_experts)
        )
        self.w2 = nn.ModuleList(_linear(w2[e]) for e in range(num_experts))

    def forward(self, x: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        if len(counts) != self.num_local_experts or sum(counts) != x.shape[0]:
            raise ValueError(
                f"counts {counts} do not describe {x.shape[0]} rows over "
                f"{self.num_local_experts} experts"
            )
        outputs = []
        for e, rows in enumerate(torch.split(x, counts)):
            if rows.shape[0] == 0:
                continue
            gate, up = self.w13[e](rows).chunk(2, dim=-1)  # [m, F] each
            outputs.append(self.w2[e](F.silu(gate) * up))  # [m, D]
        if not outputs:
            return x.new_zeros(x.shape)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _linear(weight_in_out: torch.Tensor) -> nn.Linear:
    """nn.Linear computing x @ W for W [in, out] (nn.Linear stores [out, in])."""
    d_in, d_out = weight_in_out.shape
    linear = nn.Linear(
        d_in, d_out, bias=False, device=weight_in_out.device, dtype=weight_in_out.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight_in_out.t())
    return linear


def _float_label(model: nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    return _FLOAT_LABELS.get(dtype, str(dtype).removeprefix("torch."))


def _is_router(name: str) -> bool:
    return ".router." in f".{name}."


def _linears_for_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose experts and output projection are plain nn.Linears."""
    float_model = copy.deepcopy(model).eval()
    for moe in float_model.moe_layers():
        moe.experts = ExpertLinears(moe.experts)
    if float_model.output is None:
        # tied: the lookup keeps the float embedding; the projection gets its own linear to quantise
        float_model.output = _linear(float_model.tok_embeddings.weight.detach().t())
    return float_model


def fused_float_copy(model: nn.Module) -> nn.Module:
    """The int8 path without the quantisation: a float copy with the same fused ``[w1 | w3]`` expert
    linears. The baseline that isolates what int8 itself gains (tests/benchmarks/bench_int8.py)."""
    return _linears_for_int8(model)


def fbgemm_dynamic_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 (per-channel weights) of every nn.Linear in ``module`` except routers, in place.

    The only use of the deprecated ``torch.ao.quantization`` API in moeops (docs/quantization.md
    says why it is still the CPU path). Its DeprecationWarning is shown, not swallowed: Python
    hides DeprecationWarnings raised outside ``__main__`` by default, which would keep it out of
    every replica log, so unless the operator chose warning filters (``-W`` / PYTHONWARNINGS)
    this call site's filter is "default": shown once per quantisation.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    specs = {
        name: per_channel_dynamic_qconfig
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear) and not _is_router(name)
    }
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.filterwarnings("default", category=DeprecationWarning, module=__name__)
        return quantize_dynamic(module, specs, dtype=torch.qint8, inplace=True)


def torchao_int8(module: nn.Module) -> nn.Module:
    """torchao int8 weight-only quantisation of every nn.Linear except routers, in place (CUDA)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ImportError(
            "serve.quantize=int8 on CUDA uses torchao, which is not installed: "
            "pip install 'moeops[cuda-int8]' (or torchao>=0.18), or set serve.quantize=auto or none"
        ) from exc
    quantize_(
        module,
        Int8WeightOnlyConfig(),
        filter_fn=lambda sub, name: isinstance(sub, nn.Linear) and not _is_router(name),
    )
    return module


def _cpu_engine_label() -> str:
    engine = torch.backends.quantized.engine
    return "fbgemm" if engine in ("x86", "fbgemm") else engine


def int8_pays(model: nn.Module, device: torch.device) -> bool:
    """The "auto" rule: int8 only where it measured faster than float (docs/quantization.md).

    CPU with fbgemm: expert matrices of at least AUTO_CPU_MIN_EXPERT_ELEMENTS elements.
    Elsewhere (CUDA/torchao, other CPU engines) nothing was measured on this project's machines,
    so float.
    """
    if device.type != "cpu" or _cpu_engine_label() != "fbgemm":
        return False
    cfg = model.cfg
    return cfg.dim * cfg.ffn_dim >= AUTO_CPU_MIN_EXPERT_ELEMENTS


def quantize_for_inference(
    model: nn.Module, mode: str, device: torch.device | str
) -> tuple[nn.Module, str]:
    """(model to serve, label of what was applied: "fp32" | "int8-fbgemm" | "int8-torchao" | ...).

    ``mode`` is ``serve.quantize``: "none" serves ``model`` as is; "int8" quantises a copy with the
    device's int8 path; "auto" does so only where :func:`int8_pays`. ``model`` must already be on
    ``device``; it is never modified.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode {mode!r}: must be one of {', '.join(QUANTIZE_MODES)}")
    device = torch.device(device)
    on = next(model.parameters()).device
    if on.type != device.type:
        raise ValueError(
            f"the model is on {on} but quantize_for_inference was given device {device}: "
            "move the model there first"
        )
    if mode == "none" or (mode == "auto" and not int8_pays(model, device)):
        return model, _float_label(model)
    if device.type == "cpu":
        return fbgemm_dynamic_int8(_linears_for_int8(model)), f"int8-{_cpu_engine_label()}"
    if device.type == "cuda":
        return torchao_int8(_linears_for_int8(model)), "int8-torchao"
    raise ValueError(f"no int8 path for device {device}: use quantize mode 'none'")
