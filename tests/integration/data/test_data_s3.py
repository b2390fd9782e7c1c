"""The tiers against a real S3 server (SeaweedFS): prepare, read, outages, a shared warm cache."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch

from components.config.schema import StorageConfig
from components.data.cold import ColdStorageError
from components.data.manifest import load_manifest
from components.data.reader import TieredReader
from components.data.shards import decode_shard
from components.data.tokenizer import TextTokenizer
from fixtures.s3 import prepare_small_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):
    storage = s3_server.storage(
        f"it-{uuid.uuid4().hex[:6]}",
        warm_dir=str(tmp_path_factory.mktemp("warm")),
        warm_limit_bytes=1 << 30,
        parallel_fetches=4,
        retries=2,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
        hot_prefetch_batches=2,
        verify_on_open=False,
    )
    result = prepare_small_dataset(storage, rows_per_shard=160)  # ~36 train shards: quick on S3
    return result.manifest, storage


def _storage(base: StorageConfig, tmp_path, **kw) -> StorageConfig:
    return replace(base, warm_dir=str(tmp_path / f"warm-{uuid.uuid4().hex[:6]}"), **kw)


def _reference(manifest, storage) -> list[np.ndarray]:
    from components.data.cold import read_bytes

    return [
        decode_shard(read_bytes(manifest.shard_uri(s), storage), manifest.row_len)
        for s in manifest.shards("train")
    ]


def test_prepare_writes_to_s3_and_the_reader_reads_it_back(s3_server, s3_dataset, tmp_path):
    manifest, storage = s3_dataset
    assert manifest.uri.startswith("s3://") and manifest.tokenizer_uri.startswith("s3://")
    again = load_manifest(manifest.uri, storage)
    assert again.dataset_digest == manifest.dataset_digest
    tok = TextTokenizer.load(manifest.tokenizer_uri, storage, expected_hash=manifest.tokenizer_hash)
    assert tok.vocab_size == manifest.vocab_size
    fs = s3_server.filesystem()
    root = manifest.root_uri[len("s3://") :]
    listed = {p[len(root) + 1 :] for p in fs.find(root)}
    expected = {s.name for split in manifest.splits.values() for s in split} | {
        "manifest.json",
        "tokenizer.json",
    }
    assert listed == expected  # no temp or stray objects
    reader = TieredReader(manifest.uri, "train", _storage(storage, tmp_path), seed=1, batch_size=8)
    rows = torch.cat(list(reader))
    all_rows = np.concatenate(_reference(manifest, storage))
    assert rows.shape[0] == manifest.rows("train") // 8 * 8
    assert {r.tobytes() for r in rows.numpy()} <= {r.astype(np.int64).tobytes() for r in all_rows}
    assert reader.stats()["bytes_cold"] == sum(s.bytes for s in manifest.shards("train"))


def test_cold_outage_mid_epoch_is_survived_by_retries(s3_server, s3_dataset, tmp_path):
    manifest, storage = s3_dataset
    reference = list(
        TieredReader(
            manifest.uri,
            "train",
            _storage(storage, tmp_path),
            seed=5,
            batch_size=8,
            prefetch_batches=0,
        )
    )
    # A restarted SeaweedFS refuses connections, then answers InternalError until its volume
    # server has re-registered: 6-10 s on a quiet machine, more under load. Full-jitter backoff
    # waits half its cap on average, so 40 retries capped at 2 s give a ~40 s window (never
    # under ~25 s in practice) and resume within 2 s of the server's return.
    st = _storage(
        storage, tmp_path, retries=40, backoff_base_s=0.2, backoff_max_s=2.0, parallel_fetches=1
    )
    reader = TieredReader(manifest.uri, "train", st, seed=5, batch_size=8, prefetch_batches=0)
    got = []
    restarter = None
    for i, batch in enumerate(reader):
        got.append(batch)
        if i == 30:  # a few shards in: the cold tier goes away, comes back 2 s later
            s3_server.stop()
            restarter = threading.Timer(2.0, s3_server.start)
            restarter.start()
    restarter.join()
    assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))
    assert reader.stats()["cold_retries"] >= 1


# waits out the whole retry budget of a cold tier that is gone: ~16 s
@pytest.mark.slow
def test_cold_tier_gone_for_good_names_the_shard_and_uri(s3_server, s3_dataset, tmp_path):
    manifest, storage = s3_dataset
    st = _storage(
        storage, tmp_path, retries=2, backoff_base_s=0.05, backoff_max_s=0.1, parallel_fetches=1
    )
    reader = TieredReader(manifest.uri, "train", st, seed=2, batch_size=8, prefetch_batches=2)
    s3_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(
            ColdStorageError,
            match=r"shard train/part-\d+-\d+\.parquet: cold tier 's3://.*\.parquet' "
            r"still failing after 3 attempts",
        ):
            list(reader)
        assert time.monotonic() - started < 60
    finally:
        s3_server.start()
    # nothing partial was left in the warm cache
    usage = reader.cache.usage()
    assert usage["resident"] == [] and usage["used_bytes"] == 0


def _read_all_in_child(manifest_uri: str, storage: dict, seed: int, out: mp.Queue) -> None:
    reader = TieredReader(
        manifest_uri, "train", storage, seed=seed, batch_size=8, prefetch_batches=2
    )
    rows = torch.cat(list(reader)).numpy()
    reader.close()  # wait for warm fills still in flight before reading the stats
    out.put((seed, rows.tobytes(), reader.stats()))


def test_processes_share_one_warm_cache_under_a_tight_limit(s3_server, s3_dataset, tmp_path):
    manifest, storage = s3_dataset
    shards = manifest.shards("train")
    limit = sum(sorted(s.bytes for s in shards)[-5:])  # room for ~5 of ~36 shards
    st = _storage(storage, tmp_path, warm_limit_bytes=limit, parallel_fetches=2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_read_all_in_child, args=(manifest.uri, st, seed, out))
        for seed in (1, 1, 2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # every sample correct: each process saw exactly what a private, unlimited reader sees
    solo_storage = _storage(storage, tmp_path)
    for seed, rows, _ in results:
        solo = TieredReader(manifest.uri, "train", solo_storage, seed=seed, batch_size=8)
        assert rows == torch.cat(list(solo)).numpy().tobytes()
    from components.data.warm import WarmCache

    usage = WarmCache(st.warm_dir, limit).usage()
    assert 0 < usage["max_used_bytes"] <= limit
    # each shard fetched once per residency, and the processes' cold fills are exactly those fills
    for sha, fills in usage["fills"].items():
        assert fills == usage["evictions"].get(sha, 0) + (sha in usage["resident"])
    assert sum(r[2]["cold_fills"] for r in results) == sum(usage["fills"].values())
    assert sum(usage["fills"].values()) >= len(shards)
