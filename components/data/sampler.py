"""Which sample comes next: a world-size-independent global stream, split across ranks.

The stream is epoch 0's order, then epoch 1's, ... Epoch ``e``'s order visits shards in a seeded
permutation, ``block_shards`` at a time (mosaicml-streaming's shuffle block): the rows of each
block of consecutive shards in that permutation come in one seeded permutation, so a batch mixes
the block's shards while the reader still holds only one block in memory. ``block_shards=1``
reads one shard at a time; a shard is a stretch of a few documents, so then every batch for a
shard's worth of steps comes from those few documents (issue 16: a 200-step run trained on three
of the corpus's 19 shards, one after another).

Counting from the resume point ``P``, global batch ``k`` is stream positions
``P + [k*W*B, (k+1)*W*B)`` and rank ``r`` takes ``P + k*W*B + [r*B, (r+1)*B)``. Ranks therefore
read disjoint samples, and the only state is ``position`` (global samples consumed): resuming at
any world size continues at exactly the next sample, with nothing skipped or repeated.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class GlobalOrder:
    def __init__(
        self, shard_rows: list[int], seed: int, shuffle: bool = True, block_shards: int = 1
    ):
        if not shard_rows or min(shard_rows) < 1:
            raise ValueError("a split needs at least one non-empty shard")
        if block_shards < 1:
            raise ValueError(f"block_shards={block_shards} must be >= 1")
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.seed = seed
        self.shuffle = shuffle
        # without shuffling the stored order is the order: nothing to mix
        self.block_shards = block_shards if shuffle else 1
        self.epoch_size = int(self.shard_rows.sum())
        self._shard_order = lru_cache(maxsize=4)(self._shard_order_uncached)
        self._row_order = lru_cache(maxsize=64)(self._row_order_uncached)
        self._block = lru_cache(maxsize=8)(self._block_uncached)

    def _shard_order_uncached(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index per slot, cumulative rows at the end of each slot)"""
        n = len(self.shard_rows)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        return order, np.cumsum(self.shard_rows[order])

    def _row_order_uncached(self, epoch: int, shard: int) -> np.ndarray:
        rows = int(self.shard_rows[shard])
        if not self.shuffle:
            return np.arange(rows)
        return np.random.default_rng([self.seed, epoch, shard, 1]).permutation(rows)

    def _block_uncached(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard[R], row[R]) of the R rows of block ``block`` of ``epoch``, in stream order."""
        order, _ = self._shard_order(epoch)
        shards = order[block * self.block_shards : (block + 1) * self.block_shards]
        counts = self.shard_rows[shards]
        shard_of = np.repeat(shards, counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        row_of = np.arange(len(shard_of), dtype=np.int64) - starts
        mix = np.random.default_rng([self.seed, epoch, block, 2]).permutation(len(shard_of))
        return shard_of[mix], row_of[mix]

    def _block_start(self, cum: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Epoch offset of the first row of the block holding each slot."""
        first = (slots // self.block_shards) * self.block_shards
        return np.where(first > 0, cum[np.maximum(first - 1, 0)], 0)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions[B] -> (epoch[B], shard index[B], row in shard[B])."""
        epochs, offsets = np.divmod(positions.astype(np.int64), self.epoch_size)
        shards = np.empty_like(offsets)
        rows = np.empty_like(offsets)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            sel_idx = np.flatnonzero(sel)
            order, cum = self._shard_order(epoch)
            slots = np.searchsorted(cum, offsets[sel], side="right")
            if self.block_shards > 1:
                local = offsets[sel] - self._block_start(cum, slots)
                blocks = slots // self.block_shards
                for block in np.unique(blocks).tolist():
                    mask = blocks == block
                    shard_of, row_of = self._block(epoch, block)
                    shards[sel_idx[mask]] = shard_of[local[mask]]
                    rows[sel_idx[mask]] = row_of[local[mask]]
                continue
            starts = np.where(slots > 0, cum[np.maximum(slots - 1, 0)], 0)
            shards[sel] = order[slots]
            local = offsets[sel] - starts
            for shard in np.unique(shards[sel]).tolist():
                mask = shards[sel] == shard
                rows[sel_idx[mask]] = self._row_order(epoch, shard)[local[mask]]
        return epochs, shards, rows

    def shards_from(self, position: int, count: int, end: int | None = None) -> list[int]:
        """The next ``count`` shards the stream visits from ``position`` (before ``end``), for
        prefetching: with blocks, every shard of the current block first (a batch may draw on
        any of them), then the next block's."""
        epoch, i = divmod(position, self.epoch_size)
        out: list[int] = []
        while len(out) < count and len(out) < len(self.shard_rows) * 2:
            order, cum = self._shard_order(epoch)
            slot = int(np.searchsorted(cum, i, side="right"))
            slot = (slot // self.block_shards) * self.block_shards
            block_starts = self._block_start(cum, np.arange(len(order))).tolist()
            for k in range(slot, len(order)):
                slot_start = epoch * self.epoch_size + block_starts[k]
                if (end is not None and slot_start >= end) or len(out) >= count:
                    return out
                out.append(int(order[k]))
            epoch, i = epoch + 1, 0
        return out


class SpreadOrder:
    """A held-out sample: ``size`` rows spread evenly over the split in stored order.

    Stream position ``p`` (of ``size``) is the split's row ``floor((p + 1/2) * rows / size)``, so
    the sample draws from every shard in proportion to its rows. The first ``size`` rows instead
    would be the first shard or two, a few of the corpus's documents: a narrow, noisy estimate
    that drifts with whether training has just seen those documents (issue 16: both models' loss
    on them rose once the train stream moved on to other shards). Fixed (no seed), so every model
    and every run scores on the same rows; ``size`` = the whole split is the stored order itself.
    Same interface as :class:`GlobalOrder` (``epoch_size``, ``block_shards``, ``locate``,
    ``shards_from``).
    """

    block_shards = 1  # stored order, nothing mixed

    def __init__(self, shard_rows: list[int], size: int):
        self.inner = GlobalOrder(shard_rows, 0, shuffle=False)
        if size < 1:
            raise ValueError(f"a held-out sample needs at least one row, not {size}")
        self.epoch_size = min(size, self.inner.epoch_size)
        self.stride = self.inner.epoch_size / self.epoch_size

    def positions(self, positions: np.ndarray) -> np.ndarray:
        """Sample positions -> positions in the split's stored order (later epochs repeat)."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.epoch_size)
        spread = np.floor((offsets + 0.5) * self.stride).astype(np.int64)
        return epochs * self.inner.epoch_size + spread

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.inner.locate(self.positions(positions))

    def shards_from(self, position: int, count: int, end: int | None = None) -> list[int]:
        start = int(self.positions(np.array([position]))[0])
        # ``end`` is exclusive: stop just after the row its last position maps to
        stop = None if end is None else int(self.positions(np.array([max(end, 1) - 1]))[0]) + 1
        return self.inner.shards_from(start, count, stop)


def rank_positions(
    base: int, k: int, rank: int, world_size: int, batch_size: int, n_batches: int = 1
) -> np.ndarray:
    """Stream positions of rank ``rank``'s part of global batches ``k .. k + n_batches - 1`` after
    ``base``.

    Returns int64[n_batches * batch_size], batch after batch.
    """
    starts = (
        base
        + (k + np.arange(n_batches, dtype=np.int64)) * world_size * batch_size
        + rank * batch_size
    )
    return (starts[:, None] + np.arange(batch_size, dtype=np.int64)[None, :]).reshape(-1)
