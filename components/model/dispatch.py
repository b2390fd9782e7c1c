"""Token dispatch: group routed tokens by expert, send them to the rank holding that expert,
combine.

Every assignment (token n's j-th choice, flat index ``n * k + j``) gets a sort key: its expert,
or ``E`` when capacity dropped it. One stable ``argsort`` groups the kept assignments by expert
and puts the dropped ones last; ``token = order // k`` says which token each row copies. All
routing metadata stays on the device.

Single rank: the rows go straight to the experts. With ``grouped_mm`` the group boundaries stay
on the device (zero host syncs); the loop reads the per-expert counts once (one sync).

Expert parallel (``group`` of size P, experts sharded contiguously, E/P per rank), per layer:

1. one small ``all_to_all_single`` of the per-(chunk, expert) counts, then **the one host sync**:
   the counts sent and received are read to the host in a single copy, because
   ``all_to_all_single`` takes its split sizes as Python ints and buffers must be sized;
2. per chunk, a *dispatch* all-to-all (uneven splits) sends each kept row to its expert's rank;
   the receiver regroups rows by local expert with device-side indices and runs the experts;
3. a *combine* all-to-all with the splits reversed brings results back; they are scaled by their
   fp32 gates and scatter-added (``index_add_``) into an fp32 ``[N, D]`` output.

Overlap (``async_a2a``): tokens are split into ``chunks``; every all-to-all is asynchronous.
Chunk c+1's dispatch is in flight while chunk c's experts compute and chunk c's combine while
chunk c+1's experts compute. The count exchange and the two ends have no other chunk to hide
behind: the shared expert (if any) fills them in three row slices, its first third of the tokens
while the counts are in flight (before the split-size sync), its second during the first
dispatch and its last during the last combine. Backward mirrors this: each all-to-all's gradient
is launched by one autograd node and awaited by another, and the autograd engine (which runs
ready nodes latest-created first) computes another chunk's expert backward, or a shared-expert
slice's backward, in between (tests/integration/model/test_expert_parallel.py checks the order).
With a shared expert no forward all-to-all is exposed; without one, the count exchange, the first
dispatch and the last combine are.

Payloads travel in the compute dtype (bf16 under bf16 autocast), cast once per token before the
gather; gates and the combine stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from components.config.schema import OverlapConfig
from components.model.comm_timing import CommTimer, CommTimes
from components.model.experts import compute_dtype
from components.model.host_sync import documented_sync

# experts(rows [M, D] grouped by local expert, counts: host list or device tensor [E_local]) -> [M,
# D]
ExpertFn = Callable[[torch.Tensor, "list[int] | torch.Tensor"], torch.Tensor]
# the shared expert: rows [n, D] -> [n, D], applied to every token
SharedFn = Callable[[torch.Tensor], torch.Tensor]


def expert_histogram(
    ids: torch.Tensor, bins: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """How many of ``ids`` fall in each of ``bins`` bins ([bins] long), without a host sync:
    ``torch.bincount`` reads ``max()`` back to the host on CUDA to size its output."""
    ids = ids.reshape(-1)
    ones = weights.reshape(-1).long() if weights is not None else torch.ones_like(ids)
    return torch.zeros(bins, dtype=torch.long, device=ids.device).scatter_add_(0, ids, ones)


def chunk_of_token(num_tokens: int, chunks: int, device) -> torch.Tensor:
    """[N] chunk index of each token for ``chunks`` near-equal contiguous chunks (see
    chunk_bounds)."""
    n = torch.arange(num_tokens, device=device)
    # largest c with floor(N c / C) <= n, i.e. ceil((n + 1) C / N) - 1
    return ((n + 1) * chunks + num_tokens - 1) // max(num_tokens, 1) - 1


def chunk_bounds(num_tokens: int, chunks: int) -> list[int]:
    """Token boundaries of ``chunks`` near-equal contiguous chunks (some may be empty)."""
    return [num_tokens * c // chunks for c in range(chunks + 1)]


class _A2AStart(torch.autograd.Function):
    """Issue an async all_to_all_single; the returned buffer is valid once _A2AWait has run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        return pending.launch(x, pending.in_splits, pending.out_splits)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pending = ctx.pending
        return pending.finish(backward=True), None


class _A2AWait(torch.autograd.Function):
    """Wait for the all-to-all _A2AStart issued; in backward, issue the reverse all-to-all."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        pending.finish(backward=False)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pending = ctx.pending
        pending.launch(grad_out, pending.out_splits, pending.in_splits)
        # grad_out passes through to _A2AStart.backward, which waits and returns the received grad
        return grad_out, None


class _Pending:
    """One all-to-all shared by the autograd node that starts it and the one that awaits it."""

    __slots__ = ("in_splits", "out_splits", "group", "timer", "timed", "received")

    def __init__(self, in_splits: list[int], out_splits: list[int], group, timer: CommTimer):
        self.in_splits, self.out_splits, self.group, self.timer = (
            in_splits,
            out_splits,
            group,
            timer,
        )
        self.timed = self.received = None

    def launch(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        send = x.contiguous()
        out = send.new_empty((sum(out_splits),) + tuple(send.shape[1:]))
        self.timed = self.timer.launch(
            lambda: dist.all_to_all_single(
                out,
                send,
                output_split_sizes=out_splits,
                input_split_sizes=in_splits,
                group=self.group,
                async_op=True,
            ),
            send.device,
            keep=(send, out),
        )
        self.received = out
        return out

    def finish(self, backward: bool) -> torch.Tensor:
        self.timer.wait(self.timed, backward=backward)
        received, self.timed, self.received = self.received, None, None
        return received


def a2a_start(
    x: torch.Tensor, in_splits: list[int], out_splits: list[int], group, timer: CommTimer
) -> tuple[torch.Tensor, _Pending]:
    pending = _Pending(list(in_splits), list(out_splits), group, timer)
    return _A2AStart.apply(x, pending), pending


def a2a_wait(buffer: torch.Tensor, pending: _Pending) -> torch.Tensor:
    return _A2AWait.apply(buffer, pending)


class TokenDispatcher:
    """Routes assignments to experts, locally or across an expert-parallel process group."""

    def __init__(self, num_experts: int, group, overlap: OverlapConfig):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group) if group is not None else 1
        self.ep_rank = dist.get_rank(group) if group is not None else 0
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size "
                f"{self.ep_size}"
            )
        self.num_local_experts = num_experts // self.ep_size
        self.expert_offset = self.ep_rank * self.num_local_experts
        self.async_a2a = overlap.async_a2a
        self.chunks = max(1, int(overlap.a2a_chunks)) if overlap.async_a2a else 1
        self.timer = CommTimer()

    def comm_times(self, reset: bool = False) -> CommTimes:
        return self.timer.read(reset)

    # ------------------------------------------------------------------ public
    def __call__(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        keep: torch.Tensor,
        experts: ExpertFn,
        shared: SharedFn | None = None,
    ) -> torch.Tensor:
        """x [N, D], expert_ids / weights (fp32 gates) / keep [N, k] -> fp32 [N, D]: the
        gate-weighted
        sum of each token's kept expert outputs, plus the shared expert's output if given."""
        N, k = expert_ids.shape
        dtype = compute_dtype(x)
        key = torch.where(keep, expert_ids, self.num_experts)  # [N, k]; dropped -> E, sorts last
        if self.ep_size == 1:
            return self._local(x, key, weights, dtype, experts, shared)
        return self._expert_parallel(x, key, weights, dtype, experts, shared)

    # ----------------------------------------------------------------- single rank
    def _local(self, x, key, weights, dtype, experts, shared) -> torch.Tensor:
        N, k = key.shape
        E = self.num_experts
        order = torch.argsort(
            key.reshape(-1), stable=True
        )  # [N*k] kept grouped by expert, dropped last
        token = order // k
        gate = weights.reshape(-1)[order]  # fp32 [N*k]
        out = x.new_zeros((N, x.shape[1]), dtype=torch.float32)
        if _uses_grouped_mm(experts, x):
            counts = expert_histogram(key, E + 1)  # [E + 1] on device
            # dropped rows join the last expert's group: computed, then multiplied by a zero gate
            counts = torch.cat([counts[: E - 1], counts[E - 1 :].sum(0, keepdim=True)])
        else:
            with documented_sync("loop_expert_counts", x.device):  # the loop's one host sync
                host = expert_histogram(key, E + 1).tolist()
            kept = sum(host[:E])
            token, gate, counts = token[:kept], gate[:kept], host[:E]
        y = experts(x.to(dtype)[token], counts)
        out.index_add_(0, token, y.float() * gate[:, None])
        if shared is not None:
            out = out + shared(x)
        return out

    # ----------------------------------------------------------------- expert parallel
    def _expert_parallel(self, x, key, weights, dtype, experts, shared) -> torch.Tensor:
        N, k = key.shape
        P, El, E, C = self.ep_size, self.num_local_experts, self.num_experts, self.chunks
        device = x.device

        # sort by (chunk, expert) with dropped assignments last within each chunk
        chunk = chunk_of_token(N, C, device).repeat_interleave(k, output_size=N * k)  # [N*k]
        sort_key = chunk * (E + 1) + key.reshape(-1)
        order = torch.argsort(sort_key, stable=True)
        counts = expert_histogram(sort_key, C * (E + 1)).view(C, E + 1)  # [C, E+1] incl. dropped

        # 1. exchange counts: [C, E] -> per destination rank [P, C, El]; receive [P(src), C, El]
        counts_out = counts[:, :E].reshape(C, P, El).transpose(0, 1).contiguous()
        exchange = a2a_start(
            counts_out, [1] * P, [1] * P, self.group, self.timer
        )  # one [C, El] block per rank
        # device work queued before the host waits: the GPU runs it during the count round trip
        token = order // k
        gate = weights.reshape(-1)[order]  # fp32
        rows = x.to(dtype)[token]  # [N*k, D] payload in the compute dtype
        # overlapped: the shared expert runs in three row slices, the first one here, while the
        # counts are in flight (the second hides the first dispatch, the third the last combine)
        third = (N // 3, 2 * N // 3)
        shared_parts = [shared(x[: third[0]])] if self.async_a2a and shared is not None else []
        counts_in = a2a_wait(*exchange)  # [P(src), C, El]
        # the one host sync of the layer: split sizes for every chunk's all-to-alls
        with documented_sync("ep_split_sizes", device):
            host = torch.cat([counts.reshape(-1), counts_in.reshape(-1)]).tolist()
        counts_host = [host[c * (E + 1) : (c + 1) * (E + 1)] for c in range(C)]  # [C][E+1]
        flat_in = host[C * (E + 1) :]
        recv_per_expert = [
            [[flat_in[(p * C + c) * El + e] for e in range(El)] for c in range(C)] for p in range(P)
        ]

        starts = []  # first sorted row of each chunk
        pos = 0
        for c in range(C):
            starts.append(pos)
            pos += sum(counts_host[c])

        def splits(c: int) -> tuple[list[int], list[int]]:
            sent = [sum(counts_host[c][p * El : (p + 1) * El]) for p in range(P)]
            received = [sum(recv_per_expert[p][c]) for p in range(P)]
            return sent, received

        def kept_rows(c: int) -> slice:
            return slice(starts[c], starts[c] + sum(counts_host[c][:E]))

        def dispatch(c: int):
            sent, received = splits(c)
            return a2a_start(rows[kept_rows(c)], sent, received, self.group, self.timer)

        def run_experts(c: int, received: torch.Tensor) -> torch.Tensor:
            return self._run_local_experts(
                received, counts_in[:, c], [recv_per_expert[p][c] for p in range(P)], experts
            )

        out = x.new_zeros((N, x.shape[1]), dtype=torch.float32)
        shared_out = None

        def combine(c: int, y_back: torch.Tensor) -> None:
            sl = kept_rows(c)
            out.index_add_(0, token[sl], y_back.float() * gate[sl, None])

        if not self.async_a2a:
            for c in range(C):
                received = a2a_wait(*dispatch(c))
                y = run_experts(c, received)
                sent, recv = splits(c)
                combine(c, a2a_wait(*a2a_start(y, recv, sent, self.group, self.timer)))
            shared_out = shared(x) if shared is not None else None
        else:
            # 2./3. pipelined; see the module docstring for what hides behind what
            dispatches = [None] * C
            combines = [None] * C
            dispatches[0] = dispatch(0)
            if shared is not None:
                shared_parts.append(shared(x[third[0] : third[1]]))
            for c in range(C):
                if c + 1 < C:
                    dispatches[c + 1] = dispatch(c + 1)
                received = a2a_wait(*dispatches[c])
                dispatches[c] = None
                y = run_experts(c, received)
                sent, recv = splits(c)
                combines[c] = a2a_start(y, recv, sent, self.group, self.timer)
                if c + 1 == C and shared is not None:
                    shared_out = torch.cat([*shared_parts, shared(x[third[1] :])])
                if c >= 1:  # the previous chunk's combine had this chunk's experts to hide behind
                    combine(c - 1, a2a_wait(*combines[c - 1]))
                    combines[c - 1] = None
            combine(C - 1, a2a_wait(*combines[C - 1]))
        if shared_out is not None:
            out = out + shared_out
        return out

    def _run_local_experts(
        self,
        received: torch.Tensor,
        counts_in: torch.Tensor,
        counts_host: list[list[int]],
        experts: ExpertFn,
    ) -> torch.Tensor:
        """received rows come as [src 0: e0.., e1..][src 1: e0.., e1..]; regroup them by local
        expert,
        run the experts, and return the outputs in the received layout.

        counts_in: [P, El] on the device; counts_host: the same as nested lists."""
        P, El = len(counts_host), self.num_local_experts
        R = received.shape[0]
        per_expert_host = [sum(counts_host[p][e] for p in range(P)) for e in range(El)]
        per_expert = counts_in.sum(0)  # [El] on the device
        grouped_counts = per_expert if _uses_grouped_mm(experts, received) else per_expert_host
        if El == 1 or P == 1:
            return experts(received, grouped_counts)
        # destination of received row j in block (p, e), at offset i inside it:
        #   start of expert e's group + rows of e from sources before p + i
        sizes = counts_in.reshape(-1)  # [P*El], source-major
        expert_start = torch.cumsum(per_expert, 0) - per_expert  # [El]
        before_p = torch.cumsum(counts_in, 0) - counts_in  # [P, El]
        block_dest = (expert_start[None, :] + before_p).reshape(-1)
        block_src = torch.cumsum(sizes, 0) - sizes
        dest = (block_dest - block_src).repeat_interleave(sizes, output_size=R) + torch.arange(
            R, device=received.device
        )
        inverse = torch.empty_like(dest).index_copy_(
            0, dest, torch.arange(R, device=received.device)
        )
        y = experts(received[inverse], grouped_counts)
        return y[dest]


def _uses_grouped_mm(experts, x: torch.Tensor) -> bool:
    # experts without the method (the int8 QuantizedGroupedExperts) take host counts
    return bool(getattr(experts, "uses_grouped_mm", lambda _x: False)(x))
