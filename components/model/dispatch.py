"""Token dispatch: permute routed tokens by expert, send them to the rank holding that expert, bring them back.

Single rank: a stable sort by expert id groups the kept assignments, the local experts run
one matmul per expert, and an index_copy puts the results back in token order.

Expert parallel (``group`` of size P, experts sharded contiguously, E/P per rank):

1. one small synchronous ``all_to_all_single`` exchanges how many rows every rank sends to
   every expert (for all chunks at once), so receivers can size their buffers;
2. per chunk, a *dispatch* ``all_to_all_single`` with uneven splits sends each row to its
   expert's rank; the receiver regroups rows by local expert and runs the experts;
3. a *combine* ``all_to_all_single`` with the splits reversed brings the results back.

Overlap (``async_a2a``): local tokens are split into ``chunks`` and every all-to-all is issued
with ``async_op=True``; chunk c+1's dispatch is in flight while chunk c's experts compute, and
the shared expert computes while the last combine is in flight. In backward the same holds:
the gradient all-to-all of each chunk is launched by one autograd node and awaited by another,
and autograd runs the (independent) expert backward of other chunks in between. On CPU the
async work runs on gloo's worker threads; on CUDA it runs on NCCL's own stream and
``work.wait()`` makes the compute stream wait on its completion event.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

ExpertFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass
class CommStats:
    """Seconds the compute thread spent blocked on all-to-alls: the *exposed* communication."""

    wait_s: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.wait_s, self.calls = 0.0, 0


@dataclass
class _Pending:
    """Shares one in-flight all-to-all between the autograd node that starts it and the one that waits."""

    in_splits: list[int]
    out_splits: list[int]
    group: object
    stats: CommStats
    work: object = None
    backward_work: object = None
    backward_grad: torch.Tensor | None = None


def _timed_wait(work, stats: CommStats) -> None:
    start = time.perf_counter()
    work.wait()
    stats.wait_s += time.perf_counter() - start
    stats.calls += 1


class _A2AStart(torch.autograd.Function):
    """Issue an async all_to_all_single; the returned buffer is filled once _A2AWait has run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        out = x.new_empty((sum(pending.out_splits),) + tuple(x.shape[1:]))
        pending.work = dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=pending.out_splits,
            input_split_sizes=pending.in_splits, group=pending.group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pending = ctx.pending
        _timed_wait(pending.backward_work, pending.stats)
        grad = pending.backward_grad
        pending.backward_grad = pending.backward_work = None
        return grad, None


class _A2AWait(torch.autograd.Function):
    """Wait for the all-to-all started by _A2AStart; in backward, start the reverse all-to-all."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        _timed_wait(pending.work, pending.stats)
        pending.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pending = ctx.pending
        grad_in = grad_out.new_empty((sum(pending.in_splits),) + tuple(grad_out.shape[1:]))
        pending.backward_work = dist.all_to_all_single(
            grad_in, grad_out.contiguous(), output_split_sizes=pending.in_splits,
            input_split_sizes=pending.out_splits, group=pending.group, async_op=True)
        pending.backward_grad = grad_in
        # grad_out passes through unchanged to _A2AStart.backward, which waits and returns grad_in
        return grad_out, None


def a2a_start(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group, stats: CommStats) -> tuple[torch.Tensor, _Pending]:
    pending = _Pending(list(in_splits), list(out_splits), group, stats)
    return _A2AStart.apply(x, pending), pending


def a2a_wait(buffer: torch.Tensor, pending: _Pending) -> torch.Tensor:
    return _A2AWait.apply(buffer, pending)


def chunk_bounds(num_tokens: int, chunks: int) -> list[int]:
    """Token boundaries of ``chunks`` near-equal contiguous chunks (some may be empty)."""
    return [num_tokens * c // chunks for c in range(chunks + 1)]


class TokenDispatcher:
    """Routes assignments to experts, locally or across an expert-parallel process group."""

    def __init__(self, num_experts: int, group=None, async_a2a: bool = True, chunks: int = 1):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group) if group is not None else 1
        self.ep_rank = dist.get_rank(group) if group is not None else 0
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep_size}")
        self.num_local_experts = num_experts // self.ep_size
        self.expert_offset = self.ep_rank * self.num_local_experts
        self.async_a2a = async_a2a
        self.chunks = max(1, int(chunks))
        self.stats = CommStats()

    # ------------------------------------------------------------------ public
    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor,
                 experts: ExpertFn, shared: Callable[[], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D], expert_ids/keep [N, k] -> (per-assignment outputs [N*k, D] in token-major
        order, zeros for dropped assignments; the shared expert's output or None)."""
        N, k = expert_ids.shape
        token_of = torch.arange(N, device=x.device).repeat_interleave(k)  # [N*k]
        flat_expert = expert_ids.reshape(-1)
        flat_keep = keep.reshape(-1)
        if self.ep_size == 1:
            perm, rows, counts = self._permute(x, token_of, flat_expert, flat_keep, 0, N * k)
            y = experts(rows, counts.tolist())
            shared_out = shared() if shared is not None else None
            return self._unpermute(x, [perm], [y], N * k), shared_out
        return self._expert_parallel(x, token_of, flat_expert, flat_keep, N, k, experts, shared)

    # ----------------------------------------------------------------- helpers
    def _permute(self, x, token_of, flat_expert, flat_keep, lo: int, hi: int):
        """Kept assignments of slice [lo, hi) sorted by expert: (indices, rows [m, D], counts [E])."""
        keep_idx = lo + torch.nonzero(flat_keep[lo:hi], as_tuple=True)[0]
        order = torch.argsort(flat_expert[keep_idx], stable=True)
        perm = keep_idx[order]  # assignment indices, grouped by expert
        counts = torch.bincount(flat_expert[perm], minlength=self.num_experts)
        return perm, x[token_of[perm]], counts

    @staticmethod
    def _unpermute(x, perms: list[torch.Tensor], ys: list[torch.Tensor], num_assign: int) -> torch.Tensor:
        perm = torch.cat(perms)
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        return x.new_zeros((num_assign, x.shape[1]), dtype=y.dtype).index_copy(0, perm, y)

    def _expert_parallel(self, x, token_of, flat_expert, flat_keep, N, k, experts: ExpertFn, shared):
        P, El = self.ep_size, self.num_local_experts
        bounds = chunk_bounds(N, self.chunks)
        C = self.chunks
        perms, send_rows, send_counts = [], [], []
        for c in range(C):
            perm, rows, counts = self._permute(x, token_of, flat_expert, flat_keep, bounds[c] * k, bounds[c + 1] * k)
            perms.append(perm)
            send_rows.append(rows)
            send_counts.append(counts)

        # 1. counts exchange: [C, E] -> per destination rank [P, C, El]; receive [P(src), C, El]
        counts_out = torch.stack(send_counts).view(C, P, El).transpose(0, 1).contiguous()
        counts_in = torch.empty_like(counts_out)
        start = time.perf_counter()
        dist.all_to_all_single(counts_in, counts_out, group=self.group)  # tiny and synchronous: exposed
        self.stats.wait_s += time.perf_counter() - start
        self.stats.calls += 1
        sent = counts_out.sum(-1).tolist()      # sent[p][c]: rows to rank p in chunk c
        recv = counts_in.sum(-1).tolist()       # recv[p][c]: rows from rank p in chunk c
        recv_per_expert = counts_in.tolist()    # [P][C][El]

        results: list[torch.Tensor | None] = [None] * C

        def splits(c):
            return [sent[p][c] for p in range(P)], [recv[p][c] for p in range(P)]

        def run_experts(c: int, received: torch.Tensor) -> torch.Tensor:
            # received rows are laid out [src0: e0.., e1..][src1: e0.., e1..]; regroup by local expert
            per_src = torch.tensor([recv_per_expert[p][c] for p in range(P)], dtype=torch.long)  # [P, El]
            local_id = torch.arange(El).repeat(P).repeat_interleave(per_src.reshape(-1)).to(x.device)
            regroup = torch.argsort(local_id, stable=True)
            y = experts(received[regroup], per_src.sum(0).tolist())
            return y[torch.argsort(regroup)]  # back to the received layout

        if not self.async_a2a:
            for c in range(C):
                ins, outs = splits(c)
                buf, pending = a2a_start(send_rows[c], ins, outs, self.group, self.stats)
                received = a2a_wait(buf, pending)
                y = run_experts(c, received)
                buf, pending = a2a_start(y, outs, ins, self.group, self.stats)
                results[c] = a2a_wait(buf, pending)
            shared_out = shared() if shared is not None else None
            return self._unpermute(x, perms, results, N * k), shared_out

        # 2./3. pipelined: dispatch(c+1) in flight while experts(c) compute; combines overlap too
        dispatches = [None] * C
        combines = [None] * C
        ins, outs = splits(0)
        dispatches[0] = a2a_start(send_rows[0], ins, outs, self.group, self.stats)
        for c in range(C):
            if c + 1 < C:
                ins, outs = splits(c + 1)
                dispatches[c + 1] = a2a_start(send_rows[c + 1], ins, outs, self.group, self.stats)
            received = a2a_wait(*dispatches[c])
            dispatches[c] = None
            y = run_experts(c, received)
            ins, outs = splits(c)
            combines[c] = a2a_start(y, outs, ins, self.group, self.stats)
        shared_out = shared() if shared is not None else None  # runs while the combines are in flight
        for c in range(C):
            results[c] = a2a_wait(*combines[c])
        return self._unpermute(x, perms, results, N * k), shared_out
