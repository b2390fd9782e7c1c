"""Decoder-only transformer whose FFN is an MoE layer on every ``moe_layer_interval``-th layer.

``kind="dense"`` builds the same network with a plain SwiGLU FFN of ``ffn_dim`` everywhere
(the dense baseline; see :func:`dense_equivalent` for equal active parameters).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.config.schema import ModelConfig, OverlapConfig
from components.model.comm_timing import CommTimes
from components.model.experts import is_expert_param
from components.model.layers import (
    Attention,
    FeedForward,
    KVCache,
    RMSNorm,
    SeqPositions,
    rope_tables,
)
from components.model.moe import MoELayer, MoEStats


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """The dense baseline of an MoE config with equal *active* FFN parameters per token.

    An MoE layer is active over ``top_k x ffn_dim`` hidden units (+ ``ffn_dim`` for the shared
    expert); the MoE model's other layers (``moe_layer_interval > 1``) are dense FFNs of width
    ``ffn_dim``. The dense model has one width for every layer: the MoE model's active hidden
    units over all its layers, divided by ``n_layers`` (rounded). With an MoE on every layer that
    is ``top_k x ffn_dim``; with one every other layer it is the mean of the two widths, not the
    MoE layers' width on every layer, which would give the dense model the larger budget.
    """
    if cfg.kind == "dense":
        return cfg
    moe_width = cfg.ffn_dim * (cfg.top_k + (1 if cfg.shared_expert else 0))
    n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers))
    active = moe_width * n_moe + cfg.ffn_dim * (cfg.n_layers - n_moe)
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}_dense",
        kind="dense",
        ffn_dim=round(active / cfg.n_layers),
        num_experts=1,
        top_k=1,
        shared_expert=False,
        bias_balancing=False,
    )


def is_moe_layer(cfg: ModelConfig, layer_id: int) -> bool:
    return cfg.kind == "moe" and (layer_id + 1) % cfg.moe_layer_interval == 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, ep_group, overlap: OverlapConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe: MoELayer | None = None
        self.feed_forward: FeedForward | None = None
        if is_moe_layer(cfg, layer_id):
            self.moe = MoELayer(cfg, ep_group, overlap)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    # "none" | "selective" | "full" (Transformer.configure_training); inference never recomputes
    checkpointing: str = "none"

    def forward(
        self, x, cos, sin, attn_mask, cache, start_pos
    ) -> tuple[torch.Tensor, MoEStats | None]:
        if self._recompute("full", cache):
            # the whole block, MoE layer included: backward repeats its all-to-alls and count sync
            return checkpoint(
                self._forward, x, cos, sin, attn_mask, cache, start_pos, use_reentrant=False
            )
        return self._forward(x, cos, sin, attn_mask, cache, start_pos)

    def _recompute(self, mode: str, cache) -> bool:
        return (
            self.checkpointing == mode
            and cache is None
            and self.training
            and torch.is_grad_enabled()
        )

    def _forward(self, x, cos, sin, attn_mask, cache, start_pos):
        selective = self._recompute("selective", cache)
        if selective:  # attention's activations (qkv, scores' inputs, norm) recomputed
            h = checkpoint(self._attention_part, x, cos, sin, attn_mask, use_reentrant=False)
        else:
            h = self._attention_part(x, cos, sin, attn_mask, cache, start_pos)
        if self.moe is not None:
            # never recomputed under "selective": the dispatch results stay saved, so an
            # expert-parallel layer runs its all-to-alls and host sync once per forward
            ffn_out, stats = self.moe(self.ffn_norm(h))
            return h + ffn_out, stats
        if selective:
            return checkpoint(self._ffn_part, h, use_reentrant=False), None
        return self._ffn_part(h), None

    def _attention_part(self, x, cos, sin, attn_mask, cache=None, start_pos=0) -> torch.Tensor:
        return x + self.attention(
            self.attention_norm(x), cos, sin, attn_mask, cache, self.layer_id, start_pos
        )

    def _ffn_part(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """``forward(tokens [B, T], cache=None, start_pos=0, last_only=False) -> (logits [B, T, V],
    aux)``.

    ``aux``: ``aux_loss`` and ``z_loss`` (scalars summed over MoE layers, already multiplied by
    their coefficients), ``expert_counts`` / ``kept_counts`` (per MoE layer, [E] long, this rank's
    tokens before / after capacity) and ``dropped_fraction`` (per MoE layer, scalar tensors).

    ``ep_group``: expert-parallel process group (None = all experts local); ``overlap``: the
    ``train.overlap`` section (None = its schema defaults), only ``async_a2a`` and ``a2a_chunks``
    matter here.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        ep_group=None,
        overlap: OverlapConfig | None = None,
    ):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"Transformer takes a ModelConfig, not {type(cfg).__name__}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size}: must be >= 1")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.overlap = overlap if overlap is not None else OverlapConfig()
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, i, ep_group, self.overlap) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std); output projections scaled by 1/sqrt(2 n_layers) (GPT-2), FFN down
        projections then by ``ffn_out_init_scale``.

        Expert weights are drawn for *all* experts and sliced to this rank's shard, so a model
        built at any expert-parallel size from the same seed holds the same global weights.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        ffn_out_std = out_std * self.cfg.ffn_out_init_scale
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)
        for block in self.layers:
            nn.init.normal_(block.attention.wqkv.weight, std=std)
            nn.init.normal_(block.attention.wo.weight, std=out_std)
            for norm in (block.attention_norm, block.ffn_norm):
                nn.init.ones_(norm.weight)
            dense = [block.feed_forward] if block.feed_forward is not None else []
            if block.moe is not None:
                moe = block.moe
                nn.init.normal_(moe.router.gate.weight, std=std * self.cfg.router_init_scale)
                moe.router.expert_bias.zero_()
                lo, hi = moe.expert_offset, moe.expert_offset + moe.num_local_experts
                for name, param in moe.experts.named_parameters():
                    full = torch.empty(
                        (moe.num_experts,) + tuple(param.shape[1:]), device=param.device
                    )
                    nn.init.normal_(full, std=ffn_out_std if name == "w2" else std)
                    param.copy_(full[lo:hi])
                if moe.shared_expert is not None:
                    dense.append(moe.shared_expert)
            for ffn in dense:
                nn.init.normal_(ffn.w1.weight, std=std)
                nn.init.normal_(ffn.w3.weight, std=std)
                nn.init.normal_(ffn.w2.weight, std=ffn_out_std)
        nn.init.ones_(self.norm.weight)

    # --------------------------------------------------------------- training
    def configure_training(
        self, activation_checkpointing: str = "none", compile_backend: str | None = None
    ) -> None:
        """Training-only settings (``train.activation_checkpointing``, ``train.compile``).

        ``compile_backend``: torch.compile each block's norms, attention and dense FFN / shared
        expert, and the final norm, with that backend (None: eager). The router and dispatcher
        stay eager: their shapes depend on the routing and the dispatcher holds collectives and
        the count exchange, which would break the graph (or recompile) every step. Call before
        FSDP wraps the model (compiled submodules sit inside FSDP's units).
        """
        if activation_checkpointing not in ("none", "selective", "full"):
            raise ValueError(
                f"activation_checkpointing={activation_checkpointing!r}: "
                "must be 'none', 'selective' or 'full'"
            )
        for block in self.layers:
            block.checkpointing = activation_checkpointing
        if compile_backend is None:
            return
        parts: list[nn.Module] = [self.norm]
        for block in self.layers:
            parts += [block.attention_norm, block.attention, block.ffn_norm]
            if block.feed_forward is not None:
                parts.append(block.feed_forward)
            if block.moe is not None and block.moe.shared_expert is not None:
                parts.append(block.moe.shared_expert)
        for part in parts:
            part.compile(backend=compile_backend)

    # --------------------------------------------------------------- helpers
    def moe_layers(self) -> list[MoELayer]:
        return [block.moe for block in self.layers if block.moe is not None]

    def comm_times(self, reset: bool = False) -> CommTimes:
        """Expert-parallel all-to-all time since the last reset, summed over MoE layers:
        ``exposed_s``
        (compute blocked on them) and ``total_s`` (in flight), split forward/backward. CUDA event
        timings are resolved here (a host sync): call once per logging interval, not per step."""
        total = CommTimes()
        for moe in self.moe_layers():
            total = total + moe.dispatcher.comm_times(reset)
        return total

    def num_params(self, active: bool = False) -> int:
        """Global parameter count (all experts, whatever the EP size); ``active``: per-token
        active."""
        total = 0
        for name, p in self.named_parameters():
            if is_expert_param(p):
                moe = self._moe_of(name)
                per_expert = p[0].numel()
                total += per_expert * (moe.top_k if active else moe.num_experts)
            else:
                total += p.numel()
        return total

    def _moe_of(self, param_name: str) -> MoELayer:
        return self.layers[int(param_name.split(".")[1])].moe

    def new_cache(
        self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None
    ) -> KVCache:
        """A KV cache of ``batch`` rows (lockstep batches) or slots (continuous batching)."""
        cfg = self.cfg
        device = self.tok_embeddings.weight.device
        dtype = self.tok_embeddings.weight.dtype
        return KVCache(
            cfg.n_layers,
            batch,
            cfg.n_heads,
            max_len or cfg.max_seq_len,
            cfg.dim // cfg.n_heads,
            dtype=dtype,
            device=device,
            pad=pad,
        )

    # --------------------------------------------------------------- forward
    def _positions_and_mask(
        self, B: int, T: int, cache: KVCache | None, start_pos: int | SeqPositions
    ):
        if cache is None:
            if isinstance(start_pos, SeqPositions) or start_pos:
                raise ValueError("start_pos > 0 needs a KV cache holding the earlier positions")
            return self.rope_cos[:T], self.rope_sin[:T], None
        device = self.rope_cos.device
        if isinstance(start_pos, SeqPositions):
            # each row at its own length; right padding (t >= lengths[b]) is computed but never read
            t = torch.arange(T, device=device)
            query_pos = start_pos.start.to(device)[:, None] + t[None, :]  # [B, T]
            key_pos = torch.arange(start_pos.end, device=device)  # [S]
            mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
            positions = query_pos.clamp(max=self.cfg.max_seq_len - 1)
            return self.rope_cos[positions], self.rope_sin[positions], mask[:, None]
        query_pos = start_pos + torch.arange(T, device=device)  # [T] cache slots
        key_pos = torch.arange(start_pos + T, device=device)  # [S]
        pad = cache.pad.to(device)  # [B]
        positions = (query_pos[None, :] - pad[:, None]).clamp(
            min=0
        )  # [B, T] per-sequence positions
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
        real_key = key_pos[None, :] >= pad[:, None]  # [B, S]
        mask = causal[None] & real_key[:, None]  # [B, T, S]
        # a padding query has no real key before it; let it see itself so softmax stays finite
        mask |= (key_pos[None, :] == query_pos[:, None])[None]
        return (
            self.rope_cos[positions],
            self.rope_sin[positions],
            mask[:, None],
        )  # mask [B, 1, T, S]

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int | SeqPositions = 0,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``start_pos``: int (every row at the same position) or :class:`SeqPositions` (row b =
        cache
        slot b at its own length, right-padded to T). ``last_only``: logits [B, 1, V] of each row's
        last real token instead of [B, T, V] (what decoding samples from; skips the vocab projection
        of every other position)."""
        B, T = tokens.shape
        if isinstance(start_pos, SeqPositions):
            if cache is None:
                raise ValueError("SeqPositions address cache slots: pass the KV cache")
            if start_pos.end > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence of {start_pos.end} positions exceeds model.max_seq_len="
                    f"{self.cfg.max_seq_len}"
                )
        elif start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} positions exceeds "
                f"model.max_seq_len={self.cfg.max_seq_len}"
            )
        cos, sin, mask = self._positions_and_mask(B, T, cache, start_pos)
        h = self.tok_embeddings(tokens)  # [B, T, D]
        # RoPE tables in the dtype q and k will have (autocast's, else the activations'), cast
        # once here for every layer: a bf16 run rotates in bf16 (layers.apply_rope)
        compute = (
            torch.get_autocast_dtype(h.device.type)
            if torch.is_autocast_enabled(h.device.type)
            else h.dtype
        )
        if compute != cos.dtype:
            cos, sin = cos.to(compute), sin.to(compute)
        stats: list[MoEStats] = []
        for block in self.layers:
            h, layer_stats = block(h, cos, sin, mask, cache, start_pos)
            if layer_stats is not None:
                stats.append(layer_stats)
        if last_only:
            last = (
                start_pos.lengths.to(h.device) - 1
                if isinstance(start_pos, SeqPositions)
                else torch.full((B,), T - 1, dtype=torch.long, device=h.device)
            )
            h = h[torch.arange(B, device=h.device), last][:, None]  # [B, 1, D]
        h = self.norm(h)
        logits = (
            F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        )  # [B, T, V]
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = {
            "aux_loss": self.cfg.aux_loss_coef * sum((s.aux_loss for s in stats), zero),
            "z_loss": self.cfg.z_loss_coef * sum((s.z_loss for s in stats), zero),
            "expert_counts": [s.counts for s in stats],
            "kept_counts": [s.kept_counts for s in stats],
            "dropped_fraction": [s.dropped_fraction for s in stats],
        }
        return logits, aux
