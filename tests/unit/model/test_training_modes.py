"""Training-only model settings: activation checkpointing (``none | selective | full``) and
per-block ``torch.compile`` change nothing but memory and speed.

* each checkpointing mode gives the gradients of ``none`` (MoE and dense blocks, shared expert,
  capacity dropping on), and ``selective`` never recomputes an MoE layer (its router runs once);
* compiled blocks give eager's logits and gradients. The default test backend is ``aot_eager``:
  it traces every part through Dynamo and AOTAutograd like inductor does, without generating and
  compiling C++ (minutes on 2 busy cores); ``MOEOPS_TEST_INDUCTOR=1`` runs inductor too.
* inference (a KV cache or ``no_grad``) never recomputes.
"""

from __future__ import annotations

import os

import pytest
import torch

from components.config.schema import ModelConfig
from components.model.transformer import Transformer

VOCAB = 96
MODEL = ModelConfig(
    dim=32,
    n_heads=2,
    n_layers=4,
    ffn_dim=48,
    num_experts=4,
    top_k=2,
    max_seq_len=32,
    moe_layer_interval=2,  # layers 1 and 3 MoE, 0 and 2 dense
    shared_expert=True,
    dropless=False,
    capacity_factor=1.0,
    aux_loss_coef=0.01,
    z_loss_coef=0.001,
)


def _model(checkpointing: str = "none", backend: str | None = None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(MODEL, VOCAB)
    model.configure_training(checkpointing, backend)
    return model.train()


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model: Transformer, batch: torch.Tensor):
    logits, aux = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
    ) + (aux["aux_loss"] + aux["z_loss"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_gradients_of_none(mode):
    batch = _tokens()
    ref_logits, ref_loss, ref_grads = _loss_and_grads(_model("none"), batch)
    model = _model(mode)
    router_calls = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda *_: router_calls.append(1))
    logits, loss, grads = _loss_and_grads(model, batch)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-7, rtol=1e-6), name
    # selective keeps the MoE layer's activations: 2 MoE layers -> 2 router calls; full
    # recomputes whole blocks in backward -> 4
    assert len(router_calls) == {"selective": 2, "full": 4}[mode]


def test_no_recompute_without_gradients():
    model = _model("full")
    calls = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(_tokens()[:, :-1])
    model.eval()
    cache = model.new_cache(1)
    model(_tokens()[:1, :4], cache=cache)
    assert len(calls) == 4  # two forwards, two MoE layers, nothing recomputed


def _backends() -> list[str]:
    return ["aot_eager"] + (["inductor"] if os.environ.get("MOEOPS_TEST_INDUCTOR") else [])


@pytest.mark.parametrize("backend", _backends())
def test_compiled_blocks_equal_eager(backend):
    torch._dynamo.reset()  # no graphs cached from another test's model
    batch = _tokens()
    ref_logits, ref_loss, ref_grads = _loss_and_grads(_model("none"), batch)
    compiled = _model("selective", backend)
    for _ in range(2):  # the second step reuses the compiled graphs
        for p in compiled.parameters():
            p.grad = None
        logits, loss, grads = _loss_and_grads(compiled, batch)
        assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
        assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=1e-6)
        for name, grad in grads.items():
            assert torch.allclose(grad, ref_grads[name], atol=1e-6, rtol=1e-5), (
                name,
                (grad - ref_grads[name]).abs().max(),
            )
    # the compiled parts really went through torch.compile
    assert type(compiled.layers[0].attention._compiled_call_impl).__name__ != "NoneType"
    assert compiled.layers[1].moe.router._compiled_call_impl is None  # the MoE path stays eager


def test_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        Transformer(MODEL, VOCAB).configure_training("some")
