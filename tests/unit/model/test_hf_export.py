"""Hugging Face export: transformers loads each export and computes what moeops computes.

For every model option of issue 17 (moe_tiny with/without shared expert, with/without bias
balancing, MoE every layer / every second layer, dense_tiny, top-1): fp32 logits within 1e-4 of
moeops', 32 greedy tokens identical, and the tokenizer gives the same ids. The models are random
(init_std 0.1 so greedy choices are not near-ties) with a non-trivial router bias.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from components.config import load_config
from components.model import Transformer
from components.model.export import save_export
from components.model.generate import generate
from components.model.hf_export import (
    FIELD_USE,
    HFExportError,
    choose_target,
    hf_export,
    write_hf,
)
from infra.gpu_check_hf import import_transformers

transformers = import_transformers()
pytestmark = pytest.mark.skipif(transformers is None, reason="transformers not installed")

LOGITS_ATOL = 1e-4
NEW_TOKENS = 32
TEXTS = ["def main(", "import os\nclass Config:\n    pass", "x = 1  # é ünïcode ✓\n\tdone"]

# option -> (Hydra overrides of model=..., expected architecture)
OPTIONS = {
    "moe_tiny": (["model=moe_tiny"], "Ernie4_5_MoeForCausalLM"),
    "moe_tiny_shared": (["model=moe_tiny", "model.shared_expert=true"], "Ernie4_5_MoeForCausalLM"),
    "moe_tiny_bias": (["model=moe_tiny", "model.bias_balancing=true"], "Ernie4_5_MoeForCausalLM"),
    "moe_tiny_shared_bias_interval2": (
        [
            "model=moe_tiny",
            "model.shared_expert=true",
            "model.bias_balancing=true",
            "model.moe_layer_interval=2",
            "model.n_layers=4",
        ],
        "Ernie4_5_MoeForCausalLM",
    ),
    "moe_tiny_untied": (
        ["model=moe_tiny", "model.tie_embeddings=false"],
        "Ernie4_5_MoeForCausalLM",
    ),
    "dense_tiny": (["model=dense_tiny"], "Ernie4_5ForCausalLM"),
    "top1": (["model=moe_tiny", "model.top_k=1"], "Qwen2MoeForCausalLM"),
    "top1_shared_interval2": (
        [
            "model=moe_tiny",
            "model.top_k=1",
            "model.shared_expert=true",
            "model.moe_layer_interval=2",
            "model.n_layers=4",
        ],
        "Qwen2MoeForCausalLM",
    ),
}


def _model(overrides: list[str], vocab_size: int) -> Transformer:
    cfg = dataclasses.replace(load_config(overrides).model, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(0.05 * torch.randn(cfg.num_experts))
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    from components.data.tokenizer import TextTokenizer

    return TextTokenizer.load(tiny_tokenizer_path)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_transformers_computes_what_moeops_computes(
    option, tokenizer, tiny_tokenizer_path, tmp_path
):
    overrides, architecture = OPTIONS[option]
    model = _model(overrides, tokenizer.vocab_size)
    # through the registry's artifact (save_export), as pipelines.export and register do
    export = save_export(
        model.state_dict(), model.cfg, tokenizer.vocab_size, tiny_tokenizer_path, tmp_path / "ex"
    )
    hf_dir = hf_export(export, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [architecture]

    prompts = [tokenizer.encode(t) for t in TEXTS]
    batch = torch.randint(
        0, tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, theirs = model(batch)[0], hf(batch).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=LOGITS_ATOL, rtol=0)

    greedy = generate(model, prompts, NEW_TOKENS, temperature=0.0, eos_id=tokenizer.eos_id)
    for ids, expected in zip(prompts, greedy):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
            )
        new = out[0, len(ids) :].tolist()
        if tokenizer.eos_id in new:  # moeops' generate stops before EOS
            new = new[: new.index(tokenizer.eos_id)]
        assert new == expected
    assert sum(len(g) for g in greedy) >= NEW_TOKENS, "greedy runs ended at once: nothing compared"


def test_tokenizer_round_trip_and_files(tokenizer, tmp_path):
    model = _model(["model=moe_tiny"], tokenizer.vocab_size)
    hf_dir = write_hf(model.state_dict(), model.cfg, tokenizer, tmp_path / "hf")
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in [*TEXTS, "  leading spaces , and . punctuation ;\n\n"]:
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text) == ids
        assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    assert hf_tok.eos_token_id == tokenizer.eos_id and hf_tok.pad_token_id == tokenizer.pad_id
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["eos_token_id"] == tokenizer.eos_id
    assert config["pad_token_id"] == tokenizer.pad_id and config["bos_token_id"] is None
    generation = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert generation.eos_token_id == tokenizer.eos_id


def test_chat_template_renders_what_serving_renders(tokenizer, tmp_path):
    from serving.chat_template import render
    from serving.schemas import ChatMessage

    model = _model(["model=dense_tiny"], tokenizer.vocab_size)
    hf_tok = transformers.AutoTokenizer.from_pretrained(
        write_hf(model.state_dict(), model.cfg, tokenizer, tmp_path / "hf")
    )
    conversations = [
        [{"role": "user", "content": "def add(a, b):"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": "Python only."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}],
            },
        ],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f("}],
    ]
    for messages in conversations:
        expected = render([ChatMessage(**m) for m in messages])
        got = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == expected
    closed = hf_tok.apply_chat_template(conversations[0], tokenize=False)
    assert closed == "### User:\ndef add(a, b):"
    with pytest.raises(Exception, match="tool"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_options_without_an_exact_target_are_refused_by_name(tokenizer, tmp_path, monkeypatch):
    cfg = dataclasses.replace(load_config(["model=moe_tiny"]).model, top_k=1, bias_balancing=True)
    with pytest.raises(HFExportError, match=r"model\.bias_balancing=True with model\.top_k=1"):
        choose_target(cfg)
    model = Transformer(cfg, tokenizer.vocab_size)
    with pytest.raises(HFExportError, match="bias_balancing"):
        write_hf(model.state_dict(), cfg, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists(), "nothing is written for a refused model"
    # a schema field the mapping does not know (as a future option would be), set away from its
    # default, is refused by name rather than exported as if it did not exist
    monkeypatch.delitem(FIELD_USE, "rope_theta")
    odd = dataclasses.replace(load_config(["model=moe_tiny"]).model, rope_theta=500.0)
    with pytest.raises(HFExportError, match=r"model\.rope_theta=500\.0: no Hugging Face mapping"):
        choose_target(odd)
