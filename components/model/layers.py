"""Transformer building blocks: RMSNorm, rotary embeddings, causal attention with a KV cache, SwiGLU
MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            # bf16/fp16 activations (precision=bf16 under FSDP2, a bf16 model decoding): the mean
            # of squares is accumulated in fp32 (a mean of bf16 squares loses too many bits), but
            # vector_norm reduces the input as it is, so no fp32 copy of x is made; the [..., 1]
            # scale is rounded to x's dtype and the two multiplies stay there (3 roundings of
            # 2^-8 at most against 1: tests/unit/model/test_bf16_numerics.py).
            sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square()
            scale = torch.rsqrt(sq / x.shape[-1] + self.eps).to(x.dtype)
            return x * scale * self.weight.to(x.dtype)
        # fp32 (the CPU default, the HF export parity tests): unchanged, bit for bit
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim // 2] for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x [B, H, T, hd] by per-position angles.

    cos/sin are [T, hd/2] (shared positions) or [B, T, hd/2] (per-sequence positions,
    used by left-padded batched generation).
    """
    if cos.dim() == 3:  # [B, T, hd/2] -> [B, 1, T, hd/2]
        cos, sin = cos[:, None], sin[:, None]
    # Tables in x's dtype (Transformer.forward casts them once per forward to the compute dtype):
    # rotate in that dtype, no fp32 copy of q and k. fp32 tables with a bf16 x: rotate in fp32.
    x_pairs = (x if cos.dtype == x.dtype else x.float()).unflatten(-1, (-1, 2))  # [B,H,T,hd/2,2]
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


@dataclass
class SeqPositions:
    """Per-sequence positions of a ragged batch decoded against a slot cache (continuous batching).

    Row ``b`` of the batch is the sequence in cache slot ``offset + b``; its first ``lengths[b]``
    tokens are
    real and go to positions ``start[b], start[b] + 1, ...`` (the tokens it already holds in the
    cache come before). Tokens past ``lengths[b]`` are right padding: never written, never attended.
    """

    start: torch.Tensor  # [B] long: tokens already in each row's slot
    lengths: torch.Tensor  # [B] long: real tokens of each row in this forward (>= 1)
    end: int  # max(start + lengths): the key positions attention reads
    offset: int = 0  # slot of row 0

    @classmethod
    def build(
        cls,
        start: list[int],
        lengths: list[int],
        device: torch.device | str = "cpu",
        offset: int = 0,
    ) -> SeqPositions:
        """From Python lists (what a scheduler holds), so no device sync is needed for ``end``."""
        return cls(
            torch.tensor(start, dtype=torch.long, device=device),
            torch.tensor(lengths, dtype=torch.long, device=device),
            max(s + n for s, n in zip(start, lengths)),
            offset,
        )


class KVCache:
    """Pre-allocated keys/values of every layer for incremental decoding.

    Two ways to address it:

    * ``start_pos: int`` — every row writes at the same positions (lockstep batches). ``pad`` [B]
      counts left-padding tokens per sequence: those key slots are masked out and positions are
      shifted so every sequence sees positions 0, 1, ... from its first real token.
    * ``start_pos: SeqPositions`` — each row is a cache *slot* holding its own sequence at its own
      length (continuous batching): rows of different lengths decode side by side, a finished
      sequence's slot is reused (:meth:`copy_slot` compacts slots so live rows stay 0..B-1).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | None = None,
    ):
        shape = (batch, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.slots = batch
        self.pad = (pad if pad is not None else torch.zeros(batch, dtype=torch.long)).to(device)

    def update(
        self, layer: int, start_pos: int | SeqPositions, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, hd]; return the keys/values attention reads, [B, H, S, hd].

        ``int``: written at start_pos for every row, S = start_pos + T. ``SeqPositions``: row b's
        real tokens written at its own positions in slot b, S = the longest row's end.
        """
        if isinstance(start_pos, SeqPositions):
            return self._update_rows(layer, start_pos, k, v)
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _update_rows(self, layer: int, rows: SeqPositions, k: torch.Tensor, v: torch.Tensor):
        B, _, T, _ = k.shape
        end = rows.end
        first, last = rows.offset, rows.offset + B
        if last > self.slots or end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.slots} slots x {self.max_len} positions; "
                f"writing slots {first}..{last - 1} up to position {end}"
            )
        keys, values = (
            self.keys[layer][first:last],
            self.values[layer][first:last],
        )  # [B, H, L, hd] views
        if T == 1:  # decode: one token per row
            row = torch.arange(B, device=k.device)
            keys[row, :, rows.start] = k[:, :, 0]
            values[row, :, rows.start] = v[:, :, 0]
        else:
            t = torch.arange(T, device=k.device)
            real = t[None, :] < rows.lengths[:, None]  # [B, T]
            row, col = real.nonzero(as_tuple=True)  # [N] real tokens
            pos = rows.start[row] + col
            keys[row, :, pos] = k.transpose(1, 2)[row, col]  # [N, H, hd]
            values[row, :, pos] = v.transpose(1, 2)[row, col]
        return keys[:, :, :end], values[:, :, :end]

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Move the first ``length`` cached positions of slot ``src`` into slot ``dst`` (all
        layers)."""
        n = self.max_len if length is None else length
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :n] = keys[src, :, :n]
            values[dst, :, :n] = values[src, :, :n]


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer_id: int = 0,
        start_pos: int | SeqPositions = 0,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (
            self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # 3 x [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(
                layer_id, start_pos, k, v
            )  # [B, H, S, hd], S = end of the longest row
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x). Used for dense layers and the shared expert."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
