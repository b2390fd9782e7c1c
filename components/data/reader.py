"""TieredReader: what training and evaluation read batches from.

    reader = TieredReader(manifest_uri, "train", storage, cache_dir, rank, world_size, seed,
                          batch_size, prefetch_batches, device="cpu", expected_tokenizer_hash=None)
    for batch in reader: ...          # one epoch of LongTensor[B, seq_len + 1] (inputs x[:, :-1],
                                      # targets x[:, 1:]); the last partial global batch is dropped
    reader.set_epoch(e)               # jump to epoch e unless already inside it
    for batch in reader.iter_steps(): # endless stream across epochs (step-based training), no drops
    for batch in val.iter_eval(n):    # first n global batches of the split in stored order (eval);
                                      # leaves position and epoch alone
    reader.state_dict() / load_state_dict(d)   # {"position": global samples consumed, ...}:
                                      # resume at the exact next sample, at any world size
    reader.stats()                    # warm_hit_rate, bytes_cold/warm/hot, data_wait_s, steps, ...
    reader.flow_report()              # per shard load: epoch, rank, shard, tier, sha256, rows used

Tiers: cold = ``manifest.root_uri`` (any fsspec URI, retried with backoff); warm = ``cache_dir``
(:class:`~components.data.warm.WarmCache`, shared by the node's processes, ``parallel_fetches``
shards filled ahead in parallel); hot = decoded shards in memory plus ``prefetch_batches`` batches
made ready by a background thread (pinned, copied non-blocking when ``device`` is a GPU).
Sample order: :mod:`components.data.sampler`.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from components.config.schema import StorageConfig
from components.data.cold import read_bytes, storage_or_default
from components.data.hot import Prefetcher
from components.data.manifest import Manifest, ShardInfo, load_manifest
from components.data.sampler import GlobalOrder, rank_positions
from components.data.shards import CorruptShardError, decode_shard
from components.data.warm import WarmCache

HOT_SHARDS = 3  # decoded shards kept in memory: a batch can straddle two, plus one ahead
BLOCK_BATCHES = 8  # batches located and gathered together


class TieredReader:
    def __init__(self, manifest_uri: str, split: str = "train", storage: StorageConfig | None = None, cache_dir: str | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, batch_size: int = 8,
                 prefetch_batches: int | None = None, device: str | torch.device = "cpu",
                 expected_tokenizer_hash: str | None = None, shuffle: bool | None = None):
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
        self.split, self.rank, self.world_size, self.batch_size, self.seed = split, rank, world_size, batch_size, seed
        self.shards: list[ShardInfo] = self.manifest.shards(split)
        self.order = GlobalOrder([s.rows for s in self.shards], seed, shuffle if shuffle is not None else split == "train")
        if self.order.epoch_size < world_size * batch_size:
            raise ValueError(f"split {split!r} has {self.order.epoch_size} rows, fewer than one global batch "
                             f"(world_size {world_size} x batch_size {batch_size})")
        cache_dir = cache_dir or self.storage.warm_dir
        if not cache_dir or "${" in cache_dir:
            raise ValueError("no warm cache directory: pass cache_dir or set storage.warm_dir")
        self.cache = WarmCache(cache_dir, self.storage.warm_limit_bytes, verify_on_open=self.storage.verify_on_open)
        self.prefetch_batches = self.storage.hot_prefetch_batches if prefetch_batches is None else prefetch_batches
        self.parallel_fetches = max(1, self.storage.parallel_fetches)
        self.device = torch.device(device)
        self.position = 0  # global samples consumed (all ranks agree)

        self._hot: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future] = {}        # shard index -> warm fill in flight
        self._filled_by_us: set[int] = set()       # shards our own prefetch pulled from cold
        self._lock = threading.Lock()
        self._stats = {"warm_hits": 0, "cold_fills": 0, "bytes_cold": 0, "bytes_warm": 0, "bytes_hot": 0,
                       "data_wait_s": 0.0, "steps": 0, "corrupt_refetches": 0, "cold_retries": 0}
        self._flow: list[dict] = []
        self._flow_index: dict[tuple[int, int], dict] = {}  # (epoch, shard) -> its latest flow entry

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
        in_order = GlobalOrder([s.rows for s in self.shards], self.seed, shuffle=False)
        count = in_order.epoch_size // (self.world_size * self.batch_size)
        if max_batches is not None:
            count = min(count, max_batches)
        yield from self._consume(in_order, 0, count, advance=False)

    def _consume(self, order: GlobalOrder, base: int, count: int | None, advance: bool) -> Iterator[torch.Tensor]:
        prefetcher = Prefetcher(lambda: self._produce(order, base, count), self.prefetch_batches)
        step_samples = self.world_size * self.batch_size
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(prefetcher)
                except StopIteration:
                    return
                waited = time.perf_counter() - t0
                with self._lock:
                    self._stats["data_wait_s"] += waited
                    self._stats["steps"] += 1
                    self._stats["bytes_hot"] += batch.numel() * batch.element_size()
                if advance:
                    self.position += step_samples
                if self.device.type != "cpu":
                    batch = batch.to(self.device, non_blocking=True)
                yield batch
        finally:
            prefetcher.close()

    def _produce(self, order: GlobalOrder, base: int, count: int | None) -> Iterator[torch.Tensor]:
        """Batches from ``base`` on; located and gathered BLOCK_BATCHES at a time (less Python per batch)."""
        k = 0
        last_shard = None
        B, step = self.batch_size, self.world_size * self.batch_size
        end = None if count is None else base + count * step
        while count is None or k < count:
            n = BLOCK_BATCHES if count is None else min(BLOCK_BATCHES, count - k)
            positions = rank_positions(base, k, self.rank, self.world_size, B, n)
            epochs, shards, rows = order.locate(positions)
            # numpy, not torch: a big torch copy would fan out to intra-op threads the model needs
            block = np.empty((n * B, self.manifest.row_len), dtype=np.int64)  # [n*B, seq_len + 1]
            # this rank's positions run through one shard after another: copy run by run
            cuts = np.flatnonzero((np.diff(shards) != 0) | (np.diff(epochs) != 0)) + 1
            for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(positions)]):
                epoch, shard = int(epochs[lo]), int(shards[lo])
                if shard != last_shard:
                    last_shard = shard
                    self._fetch_ahead(order, int(positions[lo]), end)
                block[lo:hi] = self._shard_rows(shard, epoch)[rows[lo:hi]]
                self._flow_index[(epoch, shard)]["rows_used"] += hi - lo
            batches = torch.from_numpy(block)
            for j in range(n):
                batch = batches[j * B:(j + 1) * B]
                if self.device.type == "cuda":
                    batch = batch.pin_memory()
                yield batch
            k += n

    # ---- tiers -----------------------------------------------------------------------------
    def _shard_rows(self, index: int, epoch: int) -> np.ndarray:
        key = (epoch, index)
        if index in self._hot:
            self._hot.move_to_end(index)
            if key not in self._flow_index:
                self._record_flow(epoch, index, "hot")
            return self._hot[index]
        shard = self.shards[index]
        ahead = self._ahead.pop(index, None)
        if ahead is not None:
            try:
                ahead.result()
            except Exception:
                pass  # the read below retries (and raises) itself
        rows = None
        for _ in range(2):
            read = self.cache.read(shard, lambda: self._fetch_cold(shard))
            with self._lock:
                prefilled = index in self._filled_by_us
                if read.tier == "cold":
                    self._stats["cold_fills"] += 1
                    self._stats["bytes_cold"] += read.cold_bytes
                else:
                    # a shard our own prefetch just filled was a miss (counted then), not a hit
                    self._stats["warm_hits"] += 0 if prefilled else 1
                    self._stats["bytes_warm"] += len(read.data)
            try:
                rows = decode_shard(read.data, self.manifest.row_len)
                break
            except CorruptShardError:
                with self._lock:
                    self._stats["corrupt_refetches"] += 1
                self.cache.discard(shard.sha256)
        if rows is None:
            raise CorruptShardError(f"shard {shard.name} ({self.manifest.shard_uri(shard)}) does not decode even "
                                    "after a fresh copy from the cold tier")
        with self._lock:
            tier = "cold" if read.tier == "cold" or index in self._filled_by_us else "warm"
            self._filled_by_us.discard(index)
        self._record_flow(epoch, index, tier)
        self._hot[index] = rows
        while len(self._hot) > HOT_SHARDS:
            self._hot.popitem(last=False)
        return rows

    def _fetch_cold(self, shard: ShardInfo) -> bytes:
        return read_bytes(self.manifest.shard_uri(shard), self.storage, what=f"shard {shard.name}",
                          on_retry=self._count_retry)

    def _count_retry(self, attempt: int, exc: BaseException) -> None:
        with self._lock:
            self._stats["cold_retries"] += 1

    def _fetch_ahead(self, order: GlobalOrder, position: int, end: int | None) -> None:
        """Fill the next ``parallel_fetches`` shards of the stream into the warm tier in parallel."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.parallel_fetches, thread_name_prefix="moeops-warm-fill")
        for index in order.shards_from(position, self.parallel_fetches + 1, end)[1:]:
            if index in self._hot or index in self._ahead:
                continue
            self._ahead[index] = self._pool.submit(self._ensure_warm, index)

    def _ensure_warm(self, index: int) -> None:
        shard = self.shards[index]
        tier, cold_bytes = self.cache.ensure(shard, lambda: self._fetch_cold(shard))
        if tier == "cold":
            with self._lock:
                self._stats["cold_fills"] += 1
                self._stats["bytes_cold"] += cold_bytes
                self._filled_by_us.add(index)

    def _record_flow(self, epoch: int, index: int, tier: str) -> None:
        shard = self.shards[index]
        entry = {"epoch": epoch, "rank": self.rank, "world_size": self.world_size, "split": self.split,
                 "shard": shard.name, "sha256": shard.sha256, "bytes": shard.bytes, "tier": tier, "rows_used": 0}
        with self._lock:
            self._flow.append(entry)
        self._flow_index[(epoch, index)] = entry

    # ---- state and reporting ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "seed": self.seed, "split": self.split,
                "dataset_digest": self.manifest.dataset_digest, "samples_per_epoch": self.order.epoch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("dataset_digest", self.manifest.dataset_digest), ("split", self.split),
                          ("seed", self.seed)):
            if key in state and state[key] != mine:
                raise ValueError(f"reader state is for {key}={state[key]!r}, this reader has {mine!r}: "
                                 "resume with the same dataset, split and seed")
        self.position = int(state["position"])

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = dict(self._stats)
        fills = s["warm_hits"] + s["cold_fills"]
        s["warm_hit_rate"] = s["warm_hits"] / fills if fills else 0.0
        s["data_wait_s_per_step"] = s["data_wait_s"] / s["steps"] if s["steps"] else 0.0
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
