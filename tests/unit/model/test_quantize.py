"""Dynamic int8: linears and experts quantised, router fp32, outputs close to fp32."""
import torch

from components.model.generate import generate
from components.model.quantize import QuantizedGroupedExperts, quantize_int8


def test_int8_model_is_close_and_generates(tiny_model):
    q = quantize_int8(tiny_model)
    assert type(q.layers[0].attention.wqkv).__name__ == "Linear" and q.layers[0].attention.wqkv.__module__.endswith("dynamic.modules.linear")
    assert isinstance(q.layers[0].moe.experts, QuantizedGroupedExperts)
    assert isinstance(q.layers[0].moe.router.gate.weight, torch.nn.Parameter)  # router stays fp32
    assert isinstance(tiny_model.layers[0].moe.experts.w1, torch.nn.Parameter)  # original untouched
    tokens = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref, _ = tiny_model(tokens)
        out, _ = q(tokens)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, f"int8 logits differ by {rel:.3f} (relative)"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7
    assert len(generate(q, [[1, 2, 3]], 4, temperature=0.0)[0]) == 4
