"""TieredReader: what training and evaluation read batches from.

    reader = TieredReader(manifest_uri, "train", storage, cache_dir, rank, world_size, seed,
                          batch_size, prefetch_batches, device="cpu", expected_tokenizer_hash=None,
                          shuffle_block_shards=8)  # rows of 8 shards at a time mixed
    for batch in reader: ...          # one epoch of LongTensor[B, seq_len + 1] (inputs x[:, :-1],
                                      # targets x[:, 1:]); the last partial global batch is dropped
    reader.set_epoch(e)               # jump to epoch e unless already inside it
    for batch in reader.iter_steps(): # endless stream across epochs (step-based training), no drops
    for batch in val.iter_eval(n):    # n global batches of rows spread evenly over the split, in
                                      # stored order (eval; the same rows every call, at any world
                                      # size for one global batch); leaves position and epoch alone
    reader.state_dict() / load_state_dict(d)   # {"position": global samples consumed, ...}:
                                      # resume at the exact next sample, at any world size
    reader.mark_step(step)            # training: the batches handed out since the last call made
    this step
    reader.stats()                    # warm_hit_rate, bytes_cold/warm/hot, data_wait_s, steps, ...
    reader.flow_report()              # shard loads and per-step batch fingerprints
    (components.data.flow)
    reader.fill_warm()                # pre-warm: every shard of the split into the warm tier, no
    decoding

Tiers: cold = ``manifest.root_uri`` (any fsspec URI, retried with backoff, large shards as parallel
ranged GETs); warm = ``cache_dir`` (:class:`~components.data.warm.WarmCache`, shared by the node's
processes); hot = decoded shards in memory (a shuffle block's, ``shuffle_block_shards``) plus
``prefetch_batches`` batches made ready by a background thread (the batch block is allocated
pinned and copied non-blocking when ``device`` is a GPU).

Shards are fetched *and decoded* ahead on a pool of ``storage.parallel_fetches`` threads, as many
shards ahead as the measured time to bring one in (fetch or warm hit, plus decode) needs to stay
ahead of the measured time the stream spends on one shard (at most ``parallel_fetches``).
A decoded shard is a zero-copy int32 view of the Arrow buffer; batches are gathered from it into
one int64 block per ``BLOCK_BATCHES`` batches that torch shares without a copy.
Sample order: :mod:`components.data.sampler`.  Fingerprints: :mod:`components.data.flow`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from components.config.schema import DataConfig, StorageConfig
from components.data.cold import read_bytes, storage_or_default
from components.data.flow import BatchPrint, batch_print, step_entry
from components.data.hot import Prefetcher
from components.data.manifest import Manifest, ShardInfo, load_manifest
from components.data.sampler import GlobalOrder, SpreadOrder, rank_positions
from components.data.shards import CorruptShardError, decode_shard
from components.data.warm import WarmCache

HOT_SHARDS = 3  # decoded shards kept in memory beyond a shuffle block's: straddling, one ahead
BLOCK_BATCHES = 8  # batches located and gathered together
EMA = 0.3  # weight of the newest measurement in the fetch / consume time averages


class TieredReader:
    def __init__(
        self,
        manifest_uri: str,
        split: str = "train",
        storage: StorageConfig | None = None,
        cache_dir: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int = 8,
        prefetch_batches: int | None = None,
        device: str | torch.device = "cpu",
        expected_tokenizer_hash: str | None = None,
        shuffle: bool | None = None,
        shuffle_block_shards: int = DataConfig.shuffle_block_shards,
    ):
        self.storage = storage_or_default(storage)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.manifest: Manifest = load_manifest(manifest_uri, self.storage)
        if expected_tokenizer_hash and expected_tokenizer_hash != self.manifest.tokenizer_hash:
            raise ValueError(
                f"tokenizer hash mismatch: dataset {self.manifest.uri} was tokenized with "
                f"{self.manifest.tokenizer_hash}, but {expected_tokenizer_hash} was expected "
                "(the model and the data must share one tokenizer; re-run prepare or fix the input)"
            )
        self.split, self.rank, self.world_size, self.batch_size, self.seed = (
            split,
            rank,
            world_size,
            batch_size,
            seed,
        )
        self.shards: list[ShardInfo] = self.manifest.shards(split)
        self._shard_names = [s.name for s in self.shards]
        self.order = GlobalOrder(
            [s.rows for s in self.shards],
            seed,
            shuffle if shuffle is not None else split == "train",
            shuffle_block_shards,
        )
        # a block's shards are all in use at once; at a block boundary a batch may still need
        # the last block's shard it is finishing
        self.hot_shards = self.order.block_shards - 1 + HOT_SHARDS
        if self.order.epoch_size < world_size * batch_size:
            raise ValueError(
                f"split {split!r} has {self.order.epoch_size} rows, fewer than one global batch "
                f"(world_size {world_size} x batch_size {batch_size})"
            )
        cache_dir = cache_dir or self.storage.warm_dir
        if not cache_dir or "${" in cache_dir:
            raise ValueError("no warm cache directory: pass cache_dir or set storage.warm_dir")
        self.cache = WarmCache(
            cache_dir, self.storage.warm_limit_bytes, verify_on_open=self.storage.verify_on_open
        )
        self.prefetch_batches = (
            self.storage.hot_prefetch_batches if prefetch_batches is None else prefetch_batches
        )
        self.parallel_fetches = max(1, self.storage.parallel_fetches)
        self.device = torch.device(device)
        self.position = 0  # global samples consumed (all ranks agree)

        self._hot: OrderedDict[int, np.ndarray] = OrderedDict()  # producer thread only
        self._ahead: dict[int, Future] = {}  # shard index -> (rows, tier) load
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._fetch_s: float | None = (
            None  # EMA: seconds to bring one shard in (fill or hit + decode)
        )
        self._consume_s: float | None = (
            None  # EMA: seconds the stream spends on one shard (not waiting)
        )
        self._switch_at: float | None = None
        self._waited_since_switch = 0.0
        self._pending: list[BatchPrint] = []  # consumer side: batches handed out since mark_step
        self._stats = {
            "warm_hits": 0,
            "cold_fills": 0,
            "bytes_cold": 0,
            "bytes_warm": 0,
            "bytes_hot": 0,
            "data_wait_s": 0.0,
            "steps": 0,
            "corrupt_refetches": 0,
            "cold_retries": 0,
        }
        self._flow: list[dict] = [
            {
                "kind": "reader",
                "rank": rank,
                "world_size": world_size,
                "split": split,
                "seed": seed,
                "batch_size": batch_size,
                "dataset_digest": self.manifest.dataset_digest,
            }
        ]
        self._flow_index: dict[
            tuple[int, int], dict
        ] = {}  # (epoch, shard) -> its latest flow entry

    # ---- iteration -------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        return self.order.epoch_size

    @property
    def epoch(self) -> int:
        return self.position // self.order.epoch_size

    def set_epoch(self, epoch: int) -> None:
        if self.epoch != epoch:
            self.position = epoch * self.order.epoch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch_end = (self.epoch + 1) * self.order.epoch_size
        count = (epoch_end - self.position) // (self.world_size * self.batch_size)
        yield from self._consume(self.order, self.position, count, advance=True)
        self.position = epoch_end  # the dropped tail belongs to this epoch

    def __len__(self) -> int:
        return self.order.epoch_size // (self.world_size * self.batch_size)

    def iter_steps(self) -> Iterator[torch.Tensor]:
        yield from self._consume(self.order, self.position, None, advance=True)

    def iter_eval(self, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        step = self.world_size * self.batch_size
        count = self.order.epoch_size // step
        if max_batches is not None:
            count = min(count, max_batches)
        # rows spread over the whole split, not its first shard: see SpreadOrder
        sample = SpreadOrder([s.rows for s in self.shards], max(count, 1) * step)
        yield from self._consume(sample, 0, count, advance=False)

    def _consume(
        self, order: GlobalOrder | SpreadOrder, base: int, count: int | None, advance: bool
    ) -> Iterator[torch.Tensor]:
        prefetcher = Prefetcher(
            lambda: self._produce(order, base, count, fingerprint=advance), self.prefetch_batches
        )
        step_samples = self.world_size * self.batch_size
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch, printed = next(prefetcher)
                except StopIteration:
                    return
                waited = time.perf_counter() - t0
                with self._lock:
                    self._stats["data_wait_s"] += waited
                    self._stats["steps"] += 1
                    self._stats["bytes_hot"] += batch.numel() * batch.element_size()
                if advance:
                    self.position += step_samples
                    self._pending.append(printed)
                if self.device.type != "cpu":
                    batch = batch.to(self.device, non_blocking=True)
                yield batch
        finally:
            prefetcher.close()
            self._drain_ahead()

    def _produce(
        self, order: GlobalOrder | SpreadOrder, base: int, count: int | None, fingerprint: bool
    ) -> Iterator[tuple[torch.Tensor, BatchPrint | None]]:
        """(batch, its fingerprint) from ``base`` on; located and gathered BLOCK_BATCHES at a
        time."""
        k = 0
        last_shard = None
        B, L = self.batch_size, self.manifest.row_len
        step = self.world_size * B
        end = None if count is None else base + count * step
        pinned = self.device.type == "cuda"
        while count is None or k < count:
            n = BLOCK_BATCHES if count is None else min(BLOCK_BATCHES, count - k)
            positions = rank_positions(base, k, self.rank, self.world_size, B, n)
            epochs, shards, rows = order.locate(positions)
            # memory torch owns (pinned for a GPU): each row is copied once, from the decoded
            # shard (a view of the Arrow buffer), widened int32 -> int64 on the way; no further
            # copies
            block = torch.empty((n * B, L), dtype=torch.int64, pin_memory=pinned)
            out = block.numpy()
            # this rank's positions run through one shard after another, or (a shuffle block)
            # mix a few shards: copy shard by shard, in the order the positions first reach them
            sources: list[np.ndarray | None] = [None] * len(positions)
            keys = epochs * len(self.shards) + shards
            _, firsts = np.unique(keys, return_index=True)
            for lo in np.sort(firsts).tolist():
                epoch, shard = int(epochs[lo]), int(shards[lo])
                at = np.flatnonzero(keys == keys[lo])
                if shard != last_shard:
                    last_shard = shard
                    self._note_switch()
                    self._fetch_ahead(order, int(positions[lo]), end)
                src = self._shard_rows(shard, epoch)
                if rows[at].max() >= len(src):
                    raise CorruptShardError(
                        f"shard {self.shards[shard].name} decodes to {len(src)} rows, "
                        f"the manifest says {self.shards[shard].rows}"
                    )
                for i, r in zip(at.tolist(), rows[at].tolist()):
                    row = src[r]
                    out[i] = row
                    sources[i] = row
                self._flow_index[(epoch, shard)]["rows_used"] += len(at)
            for j in range(n):
                sl = slice(j * B, (j + 1) * B)
                printed = (
                    batch_print(positions[sl], shards[sl], rows[sl], sources[sl])
                    if fingerprint
                    else None
                )
                yield block[sl], printed
            k += n

    # ---- tiers -----------------------------------------------------------------------------
    def _shard_rows(self, index: int, epoch: int) -> np.ndarray:
        """The decoded rows of shard ``index`` (int32[rows, seq_len + 1]), from memory or its
        load."""
        if index in self._hot:
            self._hot.move_to_end(index)
            if (epoch, index) not in self._flow_index:
                self._record_flow(epoch, index, "hot")
            return self._hot[index]
        load = self._ahead.pop(index, None)
        t0 = time.perf_counter()
        rows, tier = load.result() if load is not None else self._load(index)
        self._waited_since_switch += time.perf_counter() - t0
        self._record_flow(epoch, index, tier)
        self._hot[index] = rows
        while len(self._hot) > self.hot_shards:
            self._hot.popitem(last=False)
        return rows

    def _load(self, index: int) -> tuple[np.ndarray, str]:
        """Bring shard ``index`` in: warm hit (memory-mapped) or cold fill, then decode (a pool
        thread)."""
        started = time.perf_counter()
        shard = self.shards[index]
        tier = "warm"
        for _ in range(2):
            with self.cache.pinned(shard, lambda: self._fetch_cold(shard)) as read:
                if read.tier == "cold":
                    tier = "cold"
                try:
                    rows = decode_shard(read.data, self.manifest.row_len)
                except CorruptShardError:
                    rows = None
            with self._lock:
                if rows is None:
                    self._stats["corrupt_refetches"] += 1
                elif read.tier == "cold":
                    self._stats["cold_fills"] += 1
                    self._stats["bytes_cold"] += read.cold_bytes
                else:
                    self._stats["warm_hits"] += 1
                    self._stats["bytes_warm"] += shard.bytes
            if rows is not None:
                self._observe(fetch_s=time.perf_counter() - started)
                return rows, tier
            self.cache.discard(shard.sha256)
        raise CorruptShardError(
            f"shard {shard.name} ({self.manifest.shard_uri(shard)}) does not decode even "
            "after a fresh copy from the cold tier"
        )

    def _fetch_cold(self, shard: ShardInfo) -> bytes:
        return read_bytes(
            self.manifest.shard_uri(shard),
            self.storage,
            what=f"shard {shard.name}",
            on_retry=self._count_retry,
            size=shard.bytes,
        )

    def _count_retry(self, attempt: int, exc: BaseException) -> None:
        with self._lock:
            self._stats["cold_retries"] += 1

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.parallel_fetches, thread_name_prefix="moeops-shard-load"
            )
        return self._pool

    def shards_ahead(self) -> int:
        """How many shards to have in flight: enough that a load started now is done before the
        stream has used up the shards before it, by the measured times (at most
        parallel_fetches)."""
        with self._lock:
            fetch_s, consume_s = self._fetch_s, self._consume_s
        if fetch_s is None or consume_s is None:
            return self.parallel_fetches
        return max(1, min(self.parallel_fetches, math.ceil(fetch_s / max(consume_s, 1e-6)) + 1))

    def _fetch_ahead(
        self, order: GlobalOrder | SpreadOrder, position: int, end: int | None
    ) -> None:
        """Start loading the current shard and the next ``shards_ahead()`` of the stream."""
        pool = self._get_pool()
        # all of the current block (a batch may draw on any of its shards), then ahead
        for index in order.shards_from(position, self.shards_ahead() + order.block_shards, end):
            if index not in self._hot and index not in self._ahead:
                self._ahead[index] = pool.submit(self._load, index)

    def _note_switch(self) -> None:
        """The stream moved on to another shard: time spent on the last one, minus waiting for
        it."""
        now = time.perf_counter()
        if self._switch_at is not None:
            self._observe(consume_s=max(now - self._switch_at - self._waited_since_switch, 0.0))
        self._switch_at, self._waited_since_switch = now, 0.0

    def _observe(self, fetch_s: float | None = None, consume_s: float | None = None) -> None:
        with self._lock:
            if fetch_s is not None:
                self._fetch_s = (
                    fetch_s if self._fetch_s is None else (1 - EMA) * self._fetch_s + EMA * fetch_s
                )
            if consume_s is not None:
                self._consume_s = (
                    consume_s
                    if self._consume_s is None
                    else (1 - EMA) * self._consume_s + EMA * consume_s
                )

    def _drain_ahead(self) -> None:
        """Cancel loads nobody will use and wait for those running (they hold warm-cache
        reservations)."""
        pending, self._ahead = list(self._ahead.values()), {}
        for load in pending:
            load.cancel()
        wait(pending)

    def fill_warm(self, indices: list[int] | None = None) -> dict[str, float]:
        """Make shards of the split (default: all) resident in the warm tier, in parallel, without
        decoding them: pre-warming a node before training.  Returns shards, cold bytes, seconds."""
        indices = list(range(len(self.shards))) if indices is None else indices
        started = time.perf_counter()

        def ensure(index: int) -> tuple[str, int]:
            shard = self.shards[index]
            return self.cache.ensure(shard, lambda: self._fetch_cold(shard))

        filled = list(self._get_pool().map(ensure, indices))
        cold = [b for tier, b in filled if tier == "cold"]
        with self._lock:
            self._stats["cold_fills"] += len(cold)
            self._stats["bytes_cold"] += sum(cold)
        return {
            "shards": float(len(indices)),
            "cold_fills": float(len(cold)),
            "bytes_cold": float(sum(cold)),
            "seconds": time.perf_counter() - started,
        }

    def _record_flow(self, epoch: int, index: int, tier: str) -> None:
        shard = self.shards[index]
        entry = {
            "kind": "shard",
            "epoch": epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "split": self.split,
            "shard": shard.name,
            "sha256": shard.sha256,
            "bytes": shard.bytes,
            "tier": tier,
            "rows_used": 0,
        }
        with self._lock:
            self._flow.append(entry)
        self._flow_index[(epoch, index)] = entry

    # ---- state and reporting ---------------------------------------------------------------
    def mark_step(self, step: int) -> dict | None:
        """Close training step ``step``: the batches handed out since the last call (its
        micro-batches) become its ``batch`` entry in the flow report, which is returned."""
        if not self._pending:
            return None
        entry = step_entry(step, self.rank, self.world_size, self._pending, self._shard_names)
        self._pending = []
        with self._lock:
            self._flow.append(entry)
        return entry

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "split": self.split,
            "dataset_digest": self.manifest.dataset_digest,
            "samples_per_epoch": self.order.epoch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (
            ("dataset_digest", self.manifest.dataset_digest),
            ("split", self.split),
            ("seed", self.seed),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"reader state is for {key}={state[key]!r}, this reader has {mine!r}: "
                    "resume with the same dataset, split and seed"
                )
        self.position = int(state["position"])

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = dict(self._stats)
            fetch_s = self._fetch_s
        fills = s["warm_hits"] + s["cold_fills"]
        s["warm_hit_rate"] = s["warm_hits"] / fills if fills else 0.0
        s["data_wait_s_per_step"] = s["data_wait_s"] / s["steps"] if s["steps"] else 0.0
        s["shards_ahead"] = self.shards_ahead()
        s["shard_load_s"] = fetch_s or 0.0
        return {k: float(v) for k, v in s.items()}

    def flow_report(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self._flow]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
