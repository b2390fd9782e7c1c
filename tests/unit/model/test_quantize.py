"""int8 inference: close to fp32 on a trained model, experts on int8 GEMMs, "auto" by the rule, the
deprecated CPU API's warning visible."""

import importlib.util
import math
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from components.config.schema import ModelConfig
from components.data.tokenizer import TextTokenizer
from components.model import Transformer
from components.model.generate import generate
from components.model.quantize import (
    AUTO_CPU_MIN_EXPERT_ELEMENTS,
    ExpertLinears,
    int8_pays,
    quantize_for_inference,
    torchao_int8,
)
from components.model.quantize_check import check_int8_close, int8_agreement

CPU = torch.device("cpu")
# the conftest's tiny MoE (shared expert included), trained once for this module
TRAINED_CFG = ModelConfig(
    dim=32,
    n_heads=2,
    n_layers=2,
    ffn_dim=48,
    num_experts=4,
    top_k=2,
    max_seq_len=64,
    shared_expert=True,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny ops on 2 intra-op threads crawl when other processes hold the cores (40x measured)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tiny_tokenizer_path):
    """The tiny MoE trained for a few seconds on real Python source: (model, held-out rows [N,
    33])."""
    tokenizer = TextTokenizer.load(tiny_tokenizer_path)
    ids = torch.tensor(
        tokenizer.encode(open(textwrap.__file__, encoding="utf-8").read()), dtype=torch.long
    )
    rows = ids[: len(ids) // 33 * 33].view(-1, 33)
    train_rows, held_out = rows[:-16], rows[-16:]
    torch.manual_seed(0)
    model = Transformer(TRAINED_CFG, vocab_size=tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = train_rows[torch.randint(len(train_rows), (16,))]
        logits, aux = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + aux["aux_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), held_out


@torch.inference_mode()
def _perplexity(model, rows) -> float:
    logits, _ = model(rows[:, :-1])
    return math.exp(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()))


def test_int8_close_to_fp32_on_trained_model(trained):
    model, held_out = trained
    ppl_fp32 = _perplexity(model, held_out)
    assert ppl_fp32 < model.vocab_size / 4, "the fixture model did not learn anything"
    int8, label = quantize_for_inference(model, "int8", CPU)
    assert label == "int8-fbgemm"
    assert isinstance(
        model.layers[0].moe.experts.w1, torch.nn.Parameter
    )  # the original is untouched
    # logits within 5 % (relative norm), top-1 agreement >= 90 %, |perplexity change| <= 2 %
    agreement = check_int8_close(model, int8, held_out)
    assert agreement.reference_perplexity == pytest.approx(ppl_fp32, rel=1e-5)
    assert len(generate(int8, [[1, 2, 3]], 4, temperature=0.0)[0]) == 4


def _zero_int8_linears(linears) -> None:
    """Every weight of these dynamic int8 linears set to zero (a broken int8 path)."""
    for lin in linears:
        weight = lin.weight()  # a quantised tensor, per-channel
        with warnings.catch_warnings():
            # torch 2.13 deprecates quantised tensor creation; the fbgemm path itself makes them
            # the same way (quantize_dynamic's warning is the one asserted visible below)
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.quantize_per_channel(
                torch.zeros(weight.shape),
                weight.q_per_channel_scales(),
                weight.q_per_channel_zero_points(),
                weight.q_per_channel_axis(),
                torch.qint8,
            )
        lin.set_weight_bias(zero, lin.bias())


def test_int8_check_fails_when_the_quantized_experts_are_zero(trained):
    """The check can fail: with every quantised expert weight zeroed (routed and shared; attention
    and the output projection intact) it breaks all three bounds. (Measured: int8 itself gave a
    0.006 relative logit error, 97 % top-1 agreement, +0.11 % perplexity; zeroed experts 0.60,
    17 %, +144 %. Zeroing only the routed experts of this small model moved perplexity 2.7 %.)"""
    model, held_out = trained
    int8, _ = quantize_for_inference(model, "int8", CPU)
    for moe in int8.moe_layers():
        shared = moe.shared_expert
        _zero_int8_linears([*moe.experts.w13, *moe.experts.w2, shared.w1, shared.w2, shared.w3])
    agreement = int8_agreement(model, int8, held_out)
    assert len(agreement.failures()) == 3, agreement
    with pytest.raises(AssertionError, match="not close to its reference"):
        check_int8_close(model, int8, held_out)


def test_experts_run_int8_gemms(trained):
    model, held_out = trained
    int8, _ = quantize_for_inference(model, "int8", CPU)
    for moe in int8.moe_layers():
        assert isinstance(moe.experts, ExpertLinears)
        assert all(type(lin) is DynamicInt8Linear for lin in [*moe.experts.w13, *moe.experts.w2])
        assert type(moe.shared_expert.w1) is DynamicInt8Linear
        assert type(moe.router.gate) is torch.nn.Linear  # routing stays float
    assert (
        type(int8.layers[0].attention.wqkv) is DynamicInt8Linear
        and type(int8.output) is DynamicInt8Linear
    )
    # every linear call of a forward, experts included, is an int8 GEMM: module calls == kernel
    # calls
    calls = {m: 0 for m in int8.modules() if type(m) is DynamicInt8Linear}

    def count(module, args, output):
        calls[module] += 1

    hooks = [m.register_forward_hook(count) for m in calls]
    try:
        with (
            torch.inference_mode(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
        ):
            int8(held_out[:4, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    events = {e.key: e.count for e in prof.key_averages()}
    assert events.get("quantized::linear_dynamic", 0) == sum(calls.values()) > 0
    for moe in int8.moe_layers():
        assert (
            sum(calls[m] for m in moe.experts.modules() if m in calls) >= 2
        )  # routed rows hit w13 and w2
    # the only float GEMMs left: one router gate per MoE layer (attention runs sdpa)
    float_gemms = sum(events.get(key, 0) for key in ("aten::mm", "aten::addmm", "aten::bmm"))
    assert float_gemms == len(int8.moe_layers()), events


def test_auto_follows_the_measured_rule(tiny_model):
    assert tiny_model.cfg.dim * tiny_model.cfg.ffn_dim < AUTO_CPU_MIN_EXPERT_ELEMENTS
    served, label = quantize_for_inference(tiny_model, "auto", CPU)
    assert served is tiny_model and label == "fp32"
    assert quantize_for_inference(tiny_model, "none", CPU) == (tiny_model, "fp32")

    big = Transformer(
        ModelConfig(
            dim=512,
            n_heads=4,
            n_layers=1,
            ffn_dim=AUTO_CPU_MIN_EXPERT_ELEMENTS // 512,
            num_experts=2,
            top_k=1,
            max_seq_len=16,
        ),
        vocab_size=64,
    ).eval()
    served, label = quantize_for_inference(big, "auto", CPU)
    assert label == "int8-fbgemm" and isinstance(served.layers[0].moe.experts, ExpertLinears)
    assert not int8_pays(
        big, torch.device("cuda")
    )  # nothing measured on CUDA: auto stays float there


def test_bad_mode_and_device_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="'int4'.*none, int8, auto"):
        quantize_for_inference(tiny_model, "int4", CPU)
    with pytest.raises(
        ValueError, match="model is on cpu but quantize_for_inference was given device cuda"
    ):
        quantize_for_inference(tiny_model, "int8", torch.device("cuda"))


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed")
def test_cuda_path_without_torchao_names_the_extra(tiny_model):
    with pytest.raises(ImportError, match=r"moeops\[cuda-int8\]"):
        torchao_int8(tiny_model)


def test_deprecation_warning_is_visible_under_pythons_default_filters(tiny_model, monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])  # no -W / PYTHONWARNINGS from the operator
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("ignore", DeprecationWarning)  # what Python does outside __main__
        quantize_for_inference(tiny_model, "int8", CPU)
    shown = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert shown and "torch.ao.quantization is deprecated" in str(shown[0].message)
    assert shown[0].filename.endswith("components/model/quantize.py")


def test_serve_quantize_is_checked_before_any_cluster_work(tmp_path):
    from hydra.errors import ConfigCompositionException

    from components.config import ConfigError, load_config

    assert load_config([f"paths.root={tmp_path}"]).serve.quantize == "auto"
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["serve.quantize=int4", f"paths.root={tmp_path}"])
    assert "Invalid value 'int4', expected one of [none, int8, auto]" in str(err.value.__cause__)
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(
            ConfigError, match=r"serve.quantize='int8' on GPU replicas .*moeops\[cuda-int8\]"
        ):
            load_config(["serve.quantize=int8", "serve.num_gpus=1", f"paths.root={tmp_path}"])
