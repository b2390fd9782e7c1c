"""Export round trip (safetensors, no pickles) and expert sharding / merging."""

import json

import pytest
import torch

from components.model import Transformer
from components.model.export import (
    load_export,
    merge_expert_shards,
    save_export,
    shard_experts,
    weights_digest,
)


def test_save_and_load_export_roundtrip(tiny_model, tiny_cfg, tiny_tokenizer_path, tmp_path):
    state = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}  # as DDP names them
    out = save_export(state, tiny_cfg, 300, tiny_tokenizer_path, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",
        "model_config.json",
        "tokenizer.json",
    ]
    meta = json.loads((out / "model_config.json").read_text())
    assert meta["vocab_size"] == 300 and meta["model"]["num_experts"] == 4
    assert meta["weights_sha256"] == weights_digest(out)
    loaded = load_export(out)
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens)[0], tiny_model(tokens)[0])
    assert not loaded.model.training and loaded.tokenizer.vocab_size <= 300
    assert loaded.model_cfg.shared_expert is True
    # 4-argument form (vocab size from the embedding)
    again = save_export(
        tiny_model.state_dict(), tiny_cfg, tiny_tokenizer_path, tmp_path / "export2"
    )
    assert weights_digest(again) == weights_digest(out)


def test_shard_and_merge_are_inverse_and_match_an_ep_model(tiny_model, tiny_cfg):
    full = tiny_model.state_dict()
    shards = [shard_experts(full, r, 2) for r in range(2)]
    w1 = "layers.0.moe.experts.w1"
    assert shards[1][w1].shape[0] == 2 and torch.equal(shards[1][w1], full[w1][2:])
    assert torch.equal(shards[0]["tok_embeddings.weight"], full["tok_embeddings.weight"])
    merged = merge_expert_shards(shards)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
    # reshard 2 -> 4 -> 1 through the full state
    four = [shard_experts(merged, r, 4) for r in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(merge_expert_shards(four).values(), full.values()))
    with pytest.raises(ValueError, match="cannot be split"):
        shard_experts(full, 0, 3)


def test_export_rejects_a_sharded_state(tiny_model, tiny_cfg, tiny_tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="merge_expert_shards"):
        save_export(
            shard_experts(tiny_model.state_dict(), 0, 2),
            tiny_cfg,
            300,
            tiny_tokenizer_path,
            tmp_path / "x",
        )


def test_model_init_is_independent_of_ep_size(tiny_cfg):
    """Same seed -> same global expert weights whatever the shard (checked via the init slice)."""
    torch.manual_seed(1)
    full = Transformer(tiny_cfg, 300).state_dict()
    torch.manual_seed(1)
    again = Transformer(tiny_cfg, 300).state_dict()
    assert all(torch.equal(full[k], again[k]) for k in full)
