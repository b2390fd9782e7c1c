"""Is a quantised model still the model it was made from? Measured on held-out tokens.

``int8_agreement(reference, quantized, rows)`` compares the two models' next-token logits on the
same rows; ``check_int8_close`` raises when any figure is past its bound. Meaningful only on a
*trained* reference: a random-weight model predicts nearly uniform logits, so even a quantised
model whose experts are all zero keeps its perplexity within a fraction of a percent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Bounds of check_int8_close (docs/quantization.md): per-channel int8 weights with dynamic int8
# activations keep a trained model's logits within a few percent and its argmax almost everywhere.
MAX_REL_LOGIT_ERROR = 0.05  # ||int8 - fp32|| / ||fp32|| over all logits
MIN_TOP1_AGREEMENT = 0.90  # fraction of positions whose argmax token is the same
MAX_ABS_PERPLEXITY_CHANGE_PCT = 2.0  # |ppl(int8) - ppl(fp32)| / ppl(fp32), in percent


@dataclass(frozen=True)
class Agreement:
    rel_logit_error: float
    top1_agreement: float
    reference_perplexity: float
    quantized_perplexity: float
    perplexity_change_pct: float  # signed; the bound is on its absolute value

    def failures(self) -> list[str]:
        """The bounds this agreement breaks, in words (empty: within every bound)."""
        out = []
        if not self.rel_logit_error <= MAX_REL_LOGIT_ERROR:
            out.append(f"relative logit error {self.rel_logit_error:.4f} > {MAX_REL_LOGIT_ERROR}")
        if not self.top1_agreement >= MIN_TOP1_AGREEMENT:
            out.append(f"top-1 agreement {self.top1_agreement:.3f} < {MIN_TOP1_AGREEMENT}")
        if not abs(self.perplexity_change_pct) <= MAX_ABS_PERPLEXITY_CHANGE_PCT:
            out.append(
                f"perplexity change {self.perplexity_change_pct:+.2f} % beyond "
                f"±{MAX_ABS_PERPLEXITY_CHANGE_PCT} %"
            )
        return out


@torch.inference_mode()
def int8_agreement(reference: nn.Module, quantized: nn.Module, rows: torch.Tensor) -> Agreement:
    """Both models on ``rows`` (LongTensor [N, T + 1]: inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    inputs, targets = rows[:, :-1], rows[:, 1:].flatten()
    ref, _ = reference(inputs)  # [N, T, V]
    out, _ = quantized(inputs)
    ref, out = ref.float().flatten(0, 1), out.float().flatten(0, 1)  # [N*T, V]
    ppl_ref = math.exp(float(F.cross_entropy(ref, targets)))
    ppl_out = math.exp(float(F.cross_entropy(out, targets)))
    return Agreement(
        rel_logit_error=float((out - ref).norm() / ref.norm()),
        top1_agreement=float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        reference_perplexity=ppl_ref,
        quantized_perplexity=ppl_out,
        perplexity_change_pct=100.0 * (ppl_out - ppl_ref) / ppl_ref,
    )


def check_int8_close(reference: nn.Module, quantized: nn.Module, rows: torch.Tensor) -> Agreement:
    """:func:`int8_agreement`, raising ``AssertionError`` naming every bound it breaks."""
    agreement = int8_agreement(reference, quantized, rows)
    failures = agreement.failures()
    if failures:
        raise AssertionError(
            f"the quantised model is not close to its reference: {'; '.join(failures)} "
            f"({asdict(agreement)})"
        )
    return agreement
