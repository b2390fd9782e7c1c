"""Data-tier benchmark: warm reader vs raw pyarrow, parallel cold fill vs sequential s3fs, data wait.

    python tests/benchmarks/bench_data.py --json bench-data.json     # from the repo root
    python tests/benchmarks/bench_data.py --quick --json out.json    # tiny smoke run (tests)

Starts and stops its own SeaweedFS (S3 on 127.0.0.1), prepares a dataset into it, then measures
in one run (samples/s and MB/s of shard bytes):

- ``warm_reader`` (TieredReader over a filled warm cache, one epoch, hot thread off) vs ``raw_pyarrow`` (plain
  ``pq.read_table`` of the same local Parquet files, no shuffling or batching: the limit);
  goal ``warm_vs_raw_ratio >= 0.9``.
- ``cold_parallel`` (TieredReader from an empty warm cache: parallel fills from S3) vs
  ``cold_sequential`` (``s3fs`` cat + decode of each shard in turn); goal ratio >= 1.5.
- ``data_wait_fraction_prefetch_on/off``: share of step time spent waiting for the next batch
  in a synthetic compute loop (a fixed-size matmul per step) in steady state (warm tier filled,
  first WARMUP_STEPS steps reported separately as ``startup_wait_s_*``);
  goal < 5 % with the hot prefetch on.  ``..._cold_start`` keys: the same from an empty warm tier.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from components.config.schema import DataConfig  # noqa: E402
from components.data.build import prepare_dataset  # noqa: E402
from components.data.cold import filesystem_for  # noqa: E402
from components.data.reader import TieredReader  # noqa: E402
from components.data.shards import decode_shard  # noqa: E402
from fixtures.s3 import SMALL_DATA, SeaweedS3  # noqa: E402

FULL_DATA = {**SMALL_DATA, "name": "bench", "max_files": 400, "max_bytes": 8_000_000, "vocab_size": 2048,
             "seq_len": 128, "rows_per_shard": 256, "seed": 1}
QUICK_DATA = {**SMALL_DATA, "name": "bench-quick", "rows_per_shard": 128}
MB = 1024**2
WARMUP_STEPS = 3  # excluded from the data-wait fractions (reported as startup_wait_s_*)


def _storage(server: SeaweedS3, warm_dir: str, **kw) -> dict:
    return server.storage("bench", warm_dir=warm_dir, warm_limit_bytes=1 << 32, verify_on_open=False,
                          parallel_fetches=8, retries=3, backoff_base_s=0.05, backoff_max_s=1.0,
                          hot_prefetch_batches=8, **kw)


def _epoch(reader: TieredReader) -> tuple[float, int]:
    t0 = time.perf_counter()
    samples = sum(b.shape[0] for b in reader)
    return time.perf_counter() - t0, samples


def bench_warm_vs_raw(manifest, storage, batch_size: int, repeats: int) -> dict:
    shard_bytes = sum(s.bytes for s in manifest.shards("train"))
    filler = TieredReader(manifest.uri, "train", storage, batch_size=batch_size)
    _epoch(filler)  # fill the warm tier
    files = [filler.cache.shard_path(s.sha256) for s in manifest.shards("train")]
    filler.close()
    best_reader, best_raw, samples = float("inf"), float("inf"), 0
    best_hot = float("inf")
    for _ in range(repeats):  # interleaved, best of n: the machine is shared
        # the warm tier itself (no hot thread: its handoffs are measured by the data-wait loop)
        reader = TieredReader(manifest.uri, "train", storage, batch_size=batch_size, prefetch_batches=0)
        elapsed, samples = _epoch(reader)
        reader.close()
        best_reader = min(best_reader, elapsed)
        reader = TieredReader(manifest.uri, "train", storage, batch_size=batch_size, prefetch_batches=8)
        best_hot = min(best_hot, _epoch(reader)[0])
        reader.close()
        t0 = time.perf_counter()
        raw_rows = 0
        for f in files:
            table = pq.read_table(f, use_threads=False)  # single-threaded, like the reader
            raw_rows += len(table.column(0).to_numpy()) // manifest.row_len
        best_raw = min(best_raw, time.perf_counter() - t0)
    return {
        "warm_reader_samples_per_s": samples / best_reader, "warm_reader_mb_per_s": shard_bytes / MB / best_reader,
        "raw_pyarrow_samples_per_s": raw_rows / best_raw, "raw_pyarrow_mb_per_s": shard_bytes / MB / best_raw,
        "warm_vs_raw_ratio": (samples / best_reader) / (raw_rows / best_raw),
        "warm_reader_hot_prefetch_samples_per_s": samples / best_hot,
    }


def bench_cold(manifest, storage_for, batch_size: int) -> dict:
    shards = manifest.shards("train")
    shard_bytes = sum(s.bytes for s in shards)
    fs, _ = filesystem_for(manifest.uri, storage_for("unused"))
    t0 = time.perf_counter()
    rows = 0
    for s in shards:
        rows += decode_shard(fs.cat_file(manifest.shard_uri(s)[len("s3://"):]), manifest.row_len).shape[0]
    sequential = time.perf_counter() - t0
    reader = TieredReader(manifest.uri, "train", storage_for("cold"), batch_size=batch_size)
    parallel, samples = _epoch(reader)
    reader.close()
    return {
        "cold_sequential_samples_per_s": rows / sequential, "cold_sequential_mb_per_s": shard_bytes / MB / sequential,
        "cold_parallel_samples_per_s": samples / parallel, "cold_parallel_mb_per_s": shard_bytes / MB / parallel,
        "cold_parallel_vs_sequential_ratio": (samples / parallel) / (rows / sequential),
    }


def bench_data_wait(manifest, storage_for, batch_size: int, steps: int, compute_dim: int) -> dict:
    """Steady state (warm tier filled, as after the first epoch) and cold start (empty warm tier)."""
    a = torch.randn(compute_dim, compute_dim)
    out = {}
    for start, tag in (("", "warm"), ("_cold_start", None)):
        for name, prefetch in (("on", 8), ("off", 0)):
            storage = storage_for(tag or f"wait-{name}")
            reader = TieredReader(manifest.uri, "train", storage, batch_size=batch_size, prefetch_batches=prefetch)
            batches = reader.iter_steps()
            wait, startup_wait = 0.0, 0.0
            t_start = time.perf_counter()
            for i in range(WARMUP_STEPS + steps):
                if i == WARMUP_STEPS:  # the pipeline's one-time fill is reported on its own
                    startup_wait, wait, t_start = wait, 0.0, time.perf_counter()
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                (a @ a).sum().item()  # the "model step"
                _ = batch.sum()
            total = time.perf_counter() - t_start
            batches.close()
            reader.close()
            out[f"data_wait_fraction_prefetch_{name}{start}"] = wait / total
            out[f"step_ms_prefetch_{name}{start}"] = 1000 * total / steps
            out[f"startup_wait_s_prefetch_{name}{start}"] = startup_wait
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="json_out", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    data = QUICK_DATA if args.quick else FULL_DATA
    batch_size = 32 if args.quick else 64
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="moeops-bench-data-"))
    server = SeaweedS3(work / "s3")
    saved_env = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.start()
    try:
        storage_for = lambda tag: _storage(server, str(work / f"warm-{tag}"))  # noqa: E731
        t0 = time.perf_counter()
        manifest = prepare_dataset(DataConfig(**data), storage_for("prepare")).manifest
        results: dict = {"quick": args.quick, "prepare_s": time.perf_counter() - t0,
                         "train_shards": len(manifest.shards("train")), "train_rows": manifest.rows("train"),
                         "shard_mb": sum(s.bytes for s in manifest.shards("train")) / MB, "batch_size": batch_size}
        results.update(bench_warm_vs_raw(manifest, storage_for("warm"), batch_size, repeats=2 if args.quick else 3))
        results.update(bench_cold(manifest, storage_for, batch_size))
        results.update(bench_data_wait(manifest, storage_for, batch_size, steps=40 if args.quick else 200,
                                       compute_dim=256 if args.quick else 768))
    finally:
        server.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for key in ("warm_vs_raw_ratio", "cold_parallel_vs_sequential_ratio", "data_wait_fraction_prefetch_on",
                "data_wait_fraction_prefetch_off"):
        print(f"{key}: {results[key]:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
