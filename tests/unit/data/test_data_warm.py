from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from components.data.cold import read_bytes
from components.data.reader import TieredReader
from components.data.shards import decode_shard
from components.data.warm import WarmCache, WarmCacheError


def _fetcher(m, shard, counter):
    def fetch():
        counter.append(shard.name)
        return read_bytes(m.shard_uri(shard))

    return fetch


def test_lru_eviction_respects_the_limit_and_pins(small_dataset, tmp_path):
    result, _ = small_dataset
    m = result.manifest
    shards = m.shards("train")[:6]
    limit = sum(s.bytes for s in shards[:3]) + 10
    cache = WarmCache(str(tmp_path / "warm"), limit)
    fetched: list[str] = []
    for s in shards:
        read = cache.read(s, _fetcher(m, s, fetched))
        assert read.tier == "cold" and decode_shard(read.data, m.row_len).shape[0] == s.rows
        assert cache.usage()["used_bytes"] <= limit
    assert fetched == [s.name for s in shards]
    usage = cache.usage()
    assert usage["max_used_bytes"] <= limit
    assert shards[0].sha256 not in usage["resident"] and shards[-1].sha256 in usage["resident"]
    # a hit refreshes recency: shards[3] survives the next fill, shards[4] (now oldest) goes
    assert cache.read(shards[3], _fetcher(m, shards[3], fetched)).tier == "warm"
    cache.read(shards[0], _fetcher(m, shards[0], fetched))
    resident = cache.usage()["resident"]
    assert shards[3].sha256 in resident and shards[4].sha256 not in resident
    # each fill happened once per residency
    u = cache.usage()
    for sha, n in u["fills"].items():
        assert n == u["evictions"].get(sha, 0) + (sha in u["resident"])
    # a shard larger than the whole cache is a clear error
    with pytest.raises(WarmCacheError, match="larger than the whole warm cache limit"):
        WarmCache(str(tmp_path / "tiny"), 10).read(shards[0], _fetcher(m, shards[0], fetched))


def test_pinned_shards_are_never_evicted(small_dataset, tmp_path):
    result, _ = small_dataset
    m = result.manifest
    a, b = m.shards("train")[:2]
    cache = WarmCache(str(tmp_path / "warm"), max(a.bytes, b.bytes) + 1, wait_timeout_s=0.3)
    cache.ensure(a, _fetcher(m, a, []))
    with cache.pinned(a, _fetcher(m, a, [])) as read:  # as while another process reads it
        assert read.tier == "warm" and read.data.size == a.bytes  # memory-mapped
        with pytest.raises(WarmCacheError, match="no room in the warm cache"):
            cache.ensure(b, _fetcher(m, b, []))
        assert os.path.exists(cache.shard_path(a.sha256))
    cache.ensure(b, _fetcher(m, b, []))  # now a can go
    assert cache.usage()["resident"] == [b.sha256]


@pytest.mark.parametrize("damage", ["truncate", "flip", "flip_verify"])
def test_corrupt_or_truncated_warm_files_are_discarded_and_refetched(
    small_dataset, tmp_path, damage
):
    result, storage = small_dataset
    m = result.manifest
    st = replace(storage, warm_dir=str(tmp_path / "warm"), verify_on_open=damage == "flip_verify")
    reference = [
        b.clone()
        for b in TieredReader(m.uri, "train", st, seed=3, batch_size=8, prefetch_batches=0)
    ]
    cache = WarmCache(st.warm_dir, st.warm_limit_bytes)
    for shard in m.shards("train"):
        path = cache.shard_path(shard.sha256)
        data = bytearray(open(path, "rb").read())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:  # flip bytes in the middle (data pages), keeping the size
            mid = len(data) // 2
            data[mid : mid + 8] = bytes(255 - x for x in data[mid : mid + 8])
        open(path, "wb").write(bytes(data))
    reader = TieredReader(m.uri, "train", st, seed=3, batch_size=8, prefetch_batches=0)
    again = list(reader)
    assert len(again) == len(reference) and all(torch.equal(x, y) for x, y in zip(again, reference))
    stats = reader.stats()
    n = len(m.shards("train"))
    assert stats["cold_fills"] == n  # every damaged shard was refetched
    if damage == "flip":  # caught by Parquet page checksums while decoding
        assert stats["corrupt_refetches"] == n
    assert all(e["tier"] == "cold" for e in reader.flow_report() if e["kind"] == "shard")
