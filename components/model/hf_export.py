"""Export a moeops model to the Hugging Face layout: transformers and vLLM load it without moeops.

    hf_export(export_dir, out_dir)                  # a save_export directory -> an HF directory
    write_hf(state, model_cfg, tokenizer, out_dir)  # the same from an in-memory state dict

The network already is a standard one (read from components/model/): pre-norm RMSNorm computed
in fp32, multi-head attention without biases, *interleaved* RoPE (pairs ``2i, 2i+1``), SwiGLU
FFNs, a router ``softmax`` over all experts then ``topk(p + bias)`` (the bias only selects) with
the unbiased ``p`` of the chosen experts as weights, renormalised when k > 1, an ungated shared
expert, MoE on layer ``i`` when ``(i + 1) % moe_layer_interval == 0``, optionally tied
embeddings. Inference is dropless (capacity applies in training only), as in every target.

Targets (``choose_target``), each an exact match, never an approximation:

* ``Ernie4_5_MoeForCausalLM`` (transformers ``models/ernie4_5_moe``, vLLM ``ernie45_moe.py``):
  MoE with top_k >= 2. Its gate is fp32, selects on ``p + e_score_correction_bias``, gathers the
  unbiased ``p`` and renormalises (always: with k = 1 that makes the weight 1, not ``p``, hence
  the next target); ``shared_experts`` ungated; RoPE interleaved in fp32; MoE layer test
  ``(i + 1) % moe_layer_interval == 0 and start <= i <= end`` (start 0, end n_layers - 1).
* ``Ernie4_5ForCausalLM`` (``models/ernie4_5``, vLLM ``ernie45.py``): dense models, same
  attention and RoPE.
* ``Qwen2MoeForCausalLM`` (``models/qwen2_moe``): top_k = 1 without bias balancing, with
  ``norm_topk_prob=false`` (weight = ``p``, as moeops' top-1). Its RoPE rotates halves
  (``i, i + hd/2``): q/k rows are permuted per head so the same pairs rotate by the same angle
  (q.k is unchanged by a permutation applied to both). q/k/v carry biases (vLLM hard-codes
  them): zeros. Its shared expert is gated by ``sigmoid(shared_expert_gate x)``: a zero gate
  gives 0.5, so ``down_proj`` is doubled; without a shared expert ``down_proj`` is zero.

Every ModelConfig field is listed in :data:`FIELD_USE`; a field missing there (one added to the
schema later) with a non-default value is refused by name, so a new model option never exports
silently wrong. Weights stay fp32 (``torch_dtype`` float32): the export is exact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.config.compose import section_from_dict
from components.config.schema import ModelConfig
from components.model.export import (
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    clean_state_dict,
    read_export_config,
)
from components.model.transformer import is_moe_layer


def model_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """The typed section, or its plain form read back from an export's JSON file."""
    return section_from_dict(ModelConfig, cfg, "model")


HF_CONFIG_FILE = "config.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# serving/chat_template.py's format (role headers, turn separator), for the Jinja chat_template
HEADERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"

# What each ModelConfig field means for an inference export. "mapped": written into config.json
# or the weights; "inert": no effect on an eval-mode forward (the name, capacity (training only),
# loss weights, init, the bias's update rate, which GEMM kernel runs). Extend this table when the
# schema grows; an unlisted field with a non-default value is refused (see unmapped_fields).
FIELD_USE: dict[str, str] = {
    "name": "inert",
    "kind": "mapped",
    "dim": "mapped",
    "n_layers": "mapped",
    "n_heads": "mapped",
    "ffn_dim": "mapped",
    "max_seq_len": "mapped",
    "rope_theta": "mapped",
    "norm_eps": "mapped",
    "moe_layer_interval": "mapped",
    "num_experts": "mapped",
    "top_k": "mapped",
    "capacity_factor": "inert",
    "dropless": "inert",
    "aux_loss_coef": "inert",
    "z_loss_coef": "inert",
    "shared_expert": "mapped",
    # a constant on the routed gate weights = a constant on each routed expert's output: folded
    # into every routed expert's down_proj (neither HF target has the key)
    "routed_scaling_factor": "mapped",
    "bias_balancing": "mapped",
    "bias_update_rate": "inert",
    "tie_embeddings": "mapped",
    "init_std": "inert",
    "router_init_scale": "inert",
    "ffn_out_init_scale": "inert",
    "expert_backend": "inert",
}


class HFExportError(ValueError):
    """The model has an option no Hugging Face architecture computes exactly; names the option."""


@dataclass(frozen=True)
class TokenIds:
    eos: int
    pad: int


@dataclass(frozen=True)
class Target:
    """One Hugging Face architecture moeops maps to exactly."""

    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    config: Callable[[ModelConfig, int, TokenIds], dict[str, Any]]
    weights: Callable[[ModelConfig, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------- config.json


def _common_config(cfg: ModelConfig, vocab_size: int, ids: TokenIds) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,  # dense FFN layers (all layers of a dense model)
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,  # multi-head attention, no grouped KV
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "initializer_range": cfg.init_std,
        # the tokenizer has no BOS token: prompts start with their first text token
        "bos_token_id": None,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "torch_dtype": "float32",
    }


def _ernie_dense_config(cfg: ModelConfig, vocab_size: int, ids: TokenIds) -> dict[str, Any]:
    return {**_common_config(cfg, vocab_size, ids), "use_bias": False}


def _ernie_moe_config(cfg: ModelConfig, vocab_size: int, ids: TokenIds) -> dict[str, Any]:
    return {
        **_common_config(cfg, vocab_size, ids),
        "use_bias": False,
        "moe_num_experts": cfg.num_experts,
        "moe_k": cfg.top_k,
        "moe_intermediate_size": cfg.ffn_dim,
        # the shared expert has one expert's size: moe_intermediate_size x 1
        "moe_num_shared_experts": 1 if cfg.shared_expert else 0,
        "moe_layer_interval": cfg.moe_layer_interval,
        "moe_layer_start_index": 0,
        "moe_layer_end_index": cfg.n_layers - 1,
        # moeops divides by the plain sum; Ernie clamps it at this floor (softmax sums never
        # come near it)
        "moe_norm_min": 1e-12,
        "router_aux_loss_coef": cfg.aux_loss_coef,
    }


def _qwen2_moe_config(cfg: ModelConfig, vocab_size: int, ids: TokenIds) -> dict[str, Any]:
    return {
        **_common_config(cfg, vocab_size, ids),
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": False,  # top-1 weight = p, as moeops' top-1 (Switch)
        "moe_intermediate_size": cfg.ffn_dim,
        # always present in Qwen2-MoE; without a moeops shared expert its down_proj is zero
        "shared_expert_intermediate_size": cfg.ffn_dim,
        "decoder_sparse_step": cfg.moe_layer_interval,
        "mlp_only_layers": [],
        "qkv_bias": True,  # vLLM's Qwen2-MoE always has q/k/v biases: written as zeros
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
        "attention_dropout": 0.0,
        "router_aux_loss_coef": cfg.aux_loss_coef,
    }


# --------------------------------------------------------------------------- weights


def _half_split_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[H*hd, D] rows of q or k, per head reordered from interleaved pairs (2i, 2i+1) to halves
    (i, i + hd/2): new row i = old row 2i, new row hd/2 + i = old row 2i + 1."""
    hd = weight.shape[0] // n_heads
    per_head = weight.view(n_heads, hd // 2, 2, -1)  # [H, hd/2, 2, D]
    return per_head.transpose(1, 2).reshape(weight.shape)  # [H, 2, hd/2, D] -> [H*hd, D]


def _attention(
    state: Mapping[str, torch.Tensor], i: int, cfg: ModelConfig, half_split: bool
) -> dict[str, torch.Tensor]:
    wq, wk, wv = state[f"layers.{i}.attention.wqkv.weight"].chunk(3, dim=0)  # 3 x [D, D]
    if half_split:
        wq, wk = _half_split_rows(wq, cfg.n_heads), _half_split_rows(wk, cfg.n_heads)
    p = f"model.layers.{i}.self_attn"
    return {
        f"{p}.q_proj.weight": wq,
        f"{p}.k_proj.weight": wk,
        f"{p}.v_proj.weight": wv,
        f"{p}.o_proj.weight": state[f"layers.{i}.attention.wo.weight"],
    }


def _swiglu(state: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """A moeops FeedForward (nn.Linear w1, w3, w2) -> gate_proj, up_proj, down_proj."""
    return {
        f"{dst}.gate_proj.weight": state[f"{src}.w1.weight"],
        f"{dst}.up_proj.weight": state[f"{src}.w3.weight"],
        f"{dst}.down_proj.weight": state[f"{src}.w2.weight"],
    }


def _experts(
    state: Mapping[str, torch.Tensor], i: int, dst: str, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Batched experts w1, w3 [E, D, F] and w2 [E, F, D] (x @ w) -> per-expert nn.Linear weights
    gate_proj/up_proj [F, D] and down_proj [D, F]; ``scale`` (model.routed_scaling_factor) folded
    into down_proj."""
    w1, w3, w2 = (state[f"layers.{i}.moe.experts.{w}"] for w in ("w1", "w3", "w2"))
    out = {}
    for e in range(w1.shape[0]):
        out[f"{dst}.{e}.gate_proj.weight"] = w1[e].t()
        out[f"{dst}.{e}.up_proj.weight"] = w3[e].t()
        out[f"{dst}.{e}.down_proj.weight"] = w2[e].t() * scale if scale != 1.0 else w2[e].t()
    return out


def _common_weights(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = state[f"layers.{i}.attention_norm.weight"]
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = state[
            f"layers.{i}.ffn_norm.weight"
        ]
        if not is_moe_layer(cfg, i):
            out.update(_swiglu(state, f"layers.{i}.feed_forward", f"model.layers.{i}.mlp"))
    return out


def _ernie_weights(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _common_weights(cfg, state)
    for i in range(cfg.n_layers):
        out.update(_attention(state, i, cfg, half_split=False))
        if not is_moe_layer(cfg, i):
            continue
        mlp = f"model.layers.{i}.mlp"
        out[f"{mlp}.gate.weight"] = state[f"layers.{i}.moe.router.gate.weight"]
        # the bias selects experts only when bias balancing is on; otherwise the forward ignores
        # the buffer, so the export carries zeros
        bias = state[f"layers.{i}.moe.router.expert_bias"].float()
        if not cfg.bias_balancing:
            bias = torch.zeros_like(bias)
        out[f"{mlp}.moe_statics.e_score_correction_bias"] = bias[None]  # [1, E]
        out.update(_experts(state, i, f"{mlp}.experts", cfg.routed_scaling_factor))
        if cfg.shared_expert:
            out.update(_swiglu(state, f"layers.{i}.moe.shared_expert", f"{mlp}.shared_experts"))
    return out


def _qwen2_moe_weights(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = _common_weights(cfg, state)
    for i in range(cfg.n_layers):
        out.update(_attention(state, i, cfg, half_split=True))
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(cfg.dim)
        if not is_moe_layer(cfg, i):
            continue
        mlp = f"model.layers.{i}.mlp"
        out[f"{mlp}.gate.weight"] = state[f"layers.{i}.moe.router.gate.weight"]
        out.update(_experts(state, i, f"{mlp}.experts", cfg.routed_scaling_factor))
        # sigmoid(0) = 0.5 on every token: doubling down_proj makes the gated shared expert the
        # ungated one; no shared expert = a zero down_proj (output exactly 0)
        out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
        if cfg.shared_expert:
            shared = _swiglu(state, f"layers.{i}.moe.shared_expert", f"{mlp}.shared_expert")
            shared[f"{mlp}.shared_expert.down_proj.weight"] = (
                2.0 * shared[f"{mlp}.shared_expert.down_proj.weight"]
            )
        else:
            shared = {
                f"{mlp}.shared_expert.gate_proj.weight": torch.zeros(cfg.ffn_dim, cfg.dim),
                f"{mlp}.shared_expert.up_proj.weight": torch.zeros(cfg.ffn_dim, cfg.dim),
                f"{mlp}.shared_expert.down_proj.weight": torch.zeros(cfg.dim, cfg.ffn_dim),
            }
        out.update(shared)
    return out


ERNIE_DENSE = Target("Ernie4_5ForCausalLM", "ernie4_5", _ernie_dense_config, _ernie_weights)
ERNIE_MOE = Target("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", _ernie_moe_config, _ernie_weights)
QWEN2_MOE = Target("Qwen2MoeForCausalLM", "qwen2_moe", _qwen2_moe_config, _qwen2_moe_weights)


# --------------------------------------------------------------------------- choice


def unmapped_fields(cfg: ModelConfig) -> list[str]:
    """ModelConfig fields this module does not know that differ from their schema default."""
    default = ModelConfig()
    return [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in FIELD_USE and getattr(cfg, f.name) != getattr(default, f.name)
    ]


def choose_target(model_cfg: ModelConfig | Mapping[str, Any]) -> Target:
    """The architecture that computes exactly what this model computes, or HFExportError naming
    the option that has none."""
    cfg = model_config(model_cfg)
    unknown = unmapped_fields(cfg)
    if unknown:
        settings = ", ".join(f"model.{k}={getattr(cfg, k)!r}" for k in unknown)
        raise HFExportError(
            f"{settings}: no Hugging Face mapping is known for this option "
            "(components/model/hf_export.py FIELD_USE); refusing rather than exporting a model "
            "that computes something else"
        )
    if cfg.kind == "dense":
        return ERNIE_DENSE
    if cfg.top_k >= 2:
        return ERNIE_MOE
    if cfg.bias_balancing:
        raise HFExportError(
            "model.bias_balancing=True with model.top_k=1: no Hugging Face architecture computes "
            "it exactly (Ernie 4.5 MoE has the selection bias but renormalises a single expert's "
            "weight to 1, moeops keeps p; Qwen2-MoE keeps p but has no selection bias)"
        )
    return QWEN2_MOE


# --------------------------------------------------------------------------- tokenizer files


def chat_template_jinja() -> str:
    """serving/chat_template.py's format as a Jinja ``chat_template``: the same text as
    ``render(messages)`` when ``add_generation_prompt`` is true (what chat servers, vLLM's among
    them, pass); false leaves off the trailing assistant header, as Hugging Face templates do.
    tests/unit/model/test_hf_export.py renders both and compares (components do not import
    serving)."""

    def lit(text: str) -> str:
        return json.dumps(text)  # a JSON string literal is a valid Jinja string literal

    template = (
        "{%- set headers = HEADERS -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in headers -%}"
        "{{- raise_exception('role ' ~ message['role'] ~ ' is not supported: ' ~ ROLES) -}}"
        "{%- endif -%}"
        "{%- if not loop.first -%}{{- SEPARATOR -}}{%- endif -%}"
        "{{- '### ' ~ headers[message['role']] ~ ':' ~ NEWLINE -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- elif message['content'] -%}"
        "{%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
        "{{- SEPARATOR ~ '### ' ~ headers['assistant'] ~ ':' ~ NEWLINE -}}"
        "{%- endif -%}"
    )
    values = {
        "HEADERS": "{" + ", ".join(f"{lit(k)}: {lit(v)}" for k, v in HEADERS.items()) + "}",
        "ROLES": lit(", ".join(HEADERS)),
        "SEPARATOR": lit(TURN_SEPARATOR),
        "NEWLINE": lit("\n"),
    }
    for name, value in values.items():
        template = template.replace(name, value)
    return template


def _tokenizer_files(tokenizer, cfg: ModelConfig, out: Path) -> TokenIds:
    """tokenizer.json as trained, plus what PreTrainedTokenizerFast needs around it."""
    from components.data.tokenizer import EOS, PAD

    tokenizer.save(str(out / TOKENIZER_FILE))
    ids = TokenIds(eos=tokenizer.eos_id, pad=tokenizer.pad_id)
    specials = {"eos_token": EOS, "pad_token": PAD}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # moeops decodes the byte-level BPE as is; the default clean-up would rewrite " ." etc.
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_seq_len,
        "chat_template": chat_template_jinja(),
    }
    (out / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2))
    (out / HF_SPECIAL_TOKENS_FILE).write_text(json.dumps(specials, indent=2))
    return ids


# --------------------------------------------------------------------------- writing


def hf_state_dict(
    model_state: Mapping[str, torch.Tensor], model_cfg: ModelConfig | Mapping[str, Any]
) -> tuple[Target, dict[str, torch.Tensor]]:
    """(target, its state dict) of a full moeops state dict (all experts)."""
    cfg = model_config(model_cfg)
    target = choose_target(cfg)
    state = clean_state_dict(model_state)
    weights = target.weights(cfg, state)
    # contiguous, unshared storage: safetensors refuses views of one buffer
    return target, {k: v.detach().float().contiguous().clone() for k, v in weights.items()}


def write_hf(
    model_state: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig | Mapping[str, Any],
    tokenizer,
    out_dir: str | Path,
) -> Path:
    """Write the HF directory: config.json, model.safetensors, generation_config.json,
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json.

    ``tokenizer``: a :class:`components.data.tokenizer.TextTokenizer`. The target is chosen (or
    the export refused) before anything is written.
    """
    cfg = model_config(model_cfg)
    target, weights = hf_state_dict(model_state, cfg)
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tokenizer_files(tokenizer, cfg, out)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "architectures": [target.architecture],
        "model_type": target.model_type,
        **target.config(cfg, vocab_size, ids),
    }
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": None, "eos_token_id": ids.eos, "pad_token_id": ids.pad}
    (out / HF_GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2))
    return out


def hf_export(export_dir: str | Path, out_dir: str | Path) -> Path:
    """A ``save_export`` directory (the registry's model artifact) -> an HF directory."""
    from components.data.tokenizer import TextTokenizer

    export_dir = Path(export_dir)
    meta = read_export_config(export_dir)
    cfg = model_config(meta["model"])
    choose_target(cfg)  # refuse before reading the weights
    state = load_file(str(export_dir / WEIGHTS_FILE))
    tokenizer = TextTokenizer.load(str(export_dir / TOKENIZER_FILE))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the HF export writes a fresh directory")
    try:
        return write_hf(state, cfg, tokenizer, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
