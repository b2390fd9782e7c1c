"""Tiny models and a tiny tokenizer for the model unit tests."""

import pytest
import torch

from components.config.schema import ModelConfig
from components.model import Transformer

TINY = dict(
    dim=32,
    n_heads=2,
    n_layers=2,
    ffn_dim=48,
    num_experts=4,
    top_k=2,
    max_seq_len=64,
    shared_expert=True,
)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_cfg) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_cfg, vocab_size=300).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    from components.data.tokenizer import TextTokenizer

    text = ["def main():\n    return 0\n", "import os\nclass Config:\n    pass\n"] * 20
    tok = TextTokenizer.train(iter(text), vocab_size=300)
    return tok.save(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
