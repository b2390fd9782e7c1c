"""The model artifact: global weights (all experts) in safetensors + JSON config + tokenizer.json.

An export is independent of the expert-parallel size it was trained at: expert tensors hold all
``num_experts`` along dim 0. ``shard_experts`` / ``merge_expert_shards`` convert between a full
state dict and the per-rank state dicts of an expert-parallel model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.config.compose import section_from_dict
from components.config.schema import ModelConfig
from components.model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
# state-dict keys of expert tensors contain this; they are [num_local_experts, ...]
EXPERT_KEY_MARKER = ".moe.experts."
# wrappers that prefix parameter names (DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_expert_key(name: str) -> bool:
    return EXPERT_KEY_MARKER in name


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with DDP / compile prefixes stripped."""
    out = {}
    for name, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor.detach().cpu().contiguous()
    return out


def shard_experts(
    state: Mapping[str, torch.Tensor], ep_rank: int, ep_size: int
) -> dict[str, torch.Tensor]:
    """Full state dict -> the state dict of expert-parallel rank ``ep_rank`` of ``ep_size``
    (expert tensors sliced to its contiguous block of experts; everything else unchanged)."""
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} is not in [0, ep_size={ep_size})")
    out = {}
    for name, tensor in state.items():
        if is_expert_key(name):
            if tensor.shape[0] % ep_size:
                raise ValueError(
                    f"{name}: {tensor.shape[0]} experts cannot be split over ep_size={ep_size}"
                )
            size = tensor.shape[0] // ep_size
            tensor = tensor[ep_rank * size : (ep_rank + 1) * size]
        out[name] = tensor.clone()
    return out


def merge_expert_shards(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-rank state dicts in expert-parallel rank order -> one full state dict. Expert tensors
    are concatenated along dim 0; other tensors are taken from rank 0 (replicated)."""
    if not states:
        raise ValueError("merge_expert_shards: no state dicts given")
    names = set(states[0])
    for i, state in enumerate(states[1:], 1):
        if set(state) != names:
            raise ValueError(
                f"state {i} has keys {sorted(set(state) ^ names)} that state 0 does not (or vice "
                "versa)"
            )
    return {
        name: torch.cat([s[name] for s in states], dim=0)
        if is_expert_key(name)
        else states[0][name].clone()
        for name in states[0]
    }


def weights_digest(export_dir: str | Path) -> str:
    """sha256 of the exported weights file."""
    h = hashlib.sha256()
    with open(Path(export_dir) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_against_model(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int
) -> None:
    """Keys and shapes must be those of a single-rank model (no weights are materialised)."""
    with torch.device("meta"):
        reference = Transformer(cfg, vocab_size)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        hint = ""
        if any(is_expert_key(k) for k in wrong):
            hint = (
                " (expert tensors look expert-parallel sharded: merge_expert_shards the ranks' "
                "states first)"
            )
        raise ValueError(
            f"state dict does not match model config {cfg.name!r} with vocab_size={vocab_size}: "
            f"missing={missing[:5]}, unexpected={unexpected[:5]}, "
            f"wrong shape={[(k, tuple(state[k].shape), expected[k]) for k in wrong[:5]]}{hint}"
        )


def _copy_tokenizer(tokenizer_path: str | Path, dst: Path) -> None:
    """Local file or directory, or any URI the data tier reads (credentials from the
    environment)."""
    from components.data.tokenizer import TextTokenizer

    src = str(tokenizer_path)
    if "://" not in src and Path(src).is_dir():
        src = str(Path(src) / TOKENIZER_FILE)
    TextTokenizer.load(src).save(str(dst))


def save_export(
    model_state: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    vocab_size: int | str | Path | None,
    tokenizer_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> Path:
    """Write ``model.safetensors`` (full weights), ``model_config.json`` and ``tokenizer.json``.

    ``save_export(state, cfg, vocab_size, tokenizer_path, out_dir)``; the 4-argument form
    ``save_export(state, cfg, tokenizer_path, out_dir)`` takes the vocabulary size from the
    embedding. ``model_state`` must hold all experts (``merge_expert_shards`` first); DDP's
    ``module.`` prefixes are stripped. Returns ``out_dir``.
    """
    if out_dir is None:  # 4-argument form
        vocab_size, tokenizer_path, out_dir = None, vocab_size, tokenizer_path
    if tokenizer_path is None or out_dir is None:
        raise TypeError("save_export needs tokenizer_path and out_dir")
    cfg = model_cfg
    state = clean_state_dict(model_state)
    if "tok_embeddings.weight" not in state:
        raise ValueError("model_state has no 'tok_embeddings.weight': not a Transformer state dict")
    inferred_vocab = state["tok_embeddings.weight"].shape[0]
    vocab_size = int(vocab_size) if vocab_size is not None else inferred_vocab
    _check_against_model(state, cfg, vocab_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key only: safetensors writes metadata in hash-map order, and the file's sha256
    # is the model's identity (the format version lives in model_config.json)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    _copy_tokenizer(tokenizer_path, out / TOKENIZER_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(cfg),
        "vocab_size": vocab_size,
        "weights_sha256": weights_digest(out),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


@dataclass
class LoadedModel:
    model: Transformer  # eval mode, all experts local
    tokenizer: Any  # components.data.tokenizer.TextTokenizer
    model_cfg: ModelConfig
    vocab_size: int = 0
    export_dir: str = ""


def read_export_config(export_dir: str | Path) -> dict:
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: no {CONFIG_FILE}; not a save_export directory")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={meta.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}"
        )
    return meta


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model (single rank, eval mode) and tokenizer from a ``save_export`` directory."""
    from components.data.tokenizer import TextTokenizer

    export_dir = Path(export_dir)
    meta = read_export_config(export_dir)
    # the file's plain form back to the typed section (unknown keys name themselves)
    cfg = section_from_dict(ModelConfig, meta["model"], "model")
    model = Transformer(cfg, meta["vocab_size"])
    state = load_file(str(export_dir / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    tokenizer = TextTokenizer.load(str(export_dir / TOKENIZER_FILE))
    return LoadedModel(model, tokenizer, cfg, meta["vocab_size"], str(export_dir))
