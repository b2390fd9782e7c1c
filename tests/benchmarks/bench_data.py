"""Data-tier benchmark at real size, side by side with mosaicml-streaming and the machine's limits.

    python tests/benchmarks/bench_data.py --json bench-data.json     # from the repo root: >= 1 GiB
    python tests/benchmarks/bench_data.py --quick --json out.json    # small smoke run (tests)

Starts and stops its own SeaweedFS (S3 on 127.0.0.1).  Builds ``--gib`` GiB of token shards
(synthetic token ids; ``bench_bytes`` counts the shards' int32 tokens before compression, the
unit ``data.shard_mb`` sizes shards in, default from the config) in the product's format, and
the same tokens as mosaicml-streaming MDS (zstd, the same shard size) on the same server.  Then,
in one run (MB/s are of the moeops shards' stored bytes, samples/s of ``seq_len + 1`` rows):

- **S3 limit** ``s3_limit_*``: the same objects fetched by ``--connections`` parallel connections
  (ranged GETs of ``storage.part_mb``, one boto3 client per connection), bytes dropped;
  ``s3_sequential_*``: one ``s3fs`` cat + decode per shard in turn.
- **cold** ``cold_*``: TieredReader from an empty warm tier, one epoch (fetch, sha256, warm write,
  decode, batches, fingerprints); ``cold_fill_only_*``: the cold fill alone (``fill_warm()``:
  fetch, sha256, atomic warm write, no decoding).  ``cold_vs_s3_limit_ratio`` = cold fill / S3
  limit (``cold_epoch_vs_s3_limit_ratio``: the whole epoch), ``cold_parallel_vs_sequential_ratio``
  = cold epoch / sequential s3fs + decode, samples/s.
- **warm** ``warm_*``: TieredReader over the filled warm tier (hot thread on, and off) vs
  ``raw_pyarrow_*`` (``ParquetFile.read`` of the same local files in 2 threads, then the same
  gather: rows in shuffled order into int64 batches) and ``raw_bytes_*`` (the files' bytes read,
  the disk/page-cache limit).
- **mosaicml-streaming** ``streaming_cold_*`` (remote -> local cache, first epoch) and
  ``streaming_warm_*`` (second epoch), samples/s through a torch DataLoader of the same batch size
  with 2 persistent worker processes and the same shuffle block (``--shuffle-block-shards``,
  default ``data.shuffle_block_shards``: every reader here, the raw pyarrow gather and
  streaming shuffle the rows of that many consecutive shards together);
  ``warm_vs_streaming_ratio``, ``cold_vs_streaming_ratio``.
- **data wait** ``data_wait_fraction_prefetch_on/off``: share of step time waiting for the next
  batch in a synthetic compute loop crossing several shards (warm tier filled; ``..._cold_start``:
  from an empty one), first WARMUP_STEPS steps reported apart as ``startup_wait_s_*``.
- **prepare** ``prepare_tokens_per_s`` (tokenize + pack + write shards to S3, the prepare stage's
  chunk work) vs ``tokenizer_limit_tokens_per_s`` (HF tokenizers ``encode_batch`` on the same
  text, nothing else): ``prepare_vs_tokenizer_limit_ratio``.

``load_1m_start`` / ``load_1m_end`` / ``uptime`` say how busy the machine was.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from components.config.schema import DataConfig, StorageConfig  # noqa: E402
from components.data.build import build_chunk, plan_chunks, text_batches  # noqa: E402
from components.data.cold import filesystem_for, join  # noqa: E402
from components.data.corpus import list_corpus, read_documents  # noqa: E402
from components.data.reader import TieredReader  # noqa: E402
from components.data.shards import decode_shard  # noqa: E402
from components.data.tokenizer import TextTokenizer  # noqa: E402
from fixtures.s3 import SeaweedS3  # noqa: E402
from fixtures.token_data import commit_token_dataset  # noqa: E402

MB = 1024**2
GIB = 1024**3
WARMUP_STEPS = 3  # excluded from the data-wait fractions (reported as startup_wait_s_*)
VOCAB = 50257  # GPT-2's vocabulary size
RAW_THREADS = 2  # the raw pyarrow baseline's reader threads (the machine's cores)
STREAMING_WORKERS = 2  # mosaicml-streaming's DataLoader worker processes

FULL = {
    "gib": 1.0,
    "seq_len": 2048,
    "batch_size": 32,
    "repeats": 2,
    "wait_batch": 64,
    "wait_steps": 300,
    "compute_dim": 512,
    "text_mb": 12,
    "connections": 8,
}
QUICK = {
    "gib": 0.016,
    "shard_mb": 2,
    "seq_len": 2048,
    "batch_size": 32,
    "repeats": 5,  # an epoch here is ~50 ms: best of more interleaved runs
    "wait_batch": 16,
    "wait_steps": 120,
    "compute_dim": 128,
    "text_mb": 0.5,
    "connections": 8,
}


def synthetic_shard(rows: int, row_len: int, seed: int) -> np.ndarray:
    """Log-uniform token ids (Zipf with exponent 1: a few ids very common, like text), which zstd
    stores in about 1.85 bytes per token, close to real tokenized text."""
    u = np.random.default_rng(seed).random(rows * row_len, dtype=np.float32)
    ids = np.exp(u * np.float32(np.log(VOCAB + 10))) - 10
    return ids.astype(np.int32).clip(0, VOCAB - 1).reshape(rows, row_len)


def import_streaming():
    """mosaicml-streaming's ``streaming.base`` without the package ``__init__``: that one also
    imports ``streaming.vision`` -> torchvision, which `make setup` removes where PyPI's wheel does
    not match the CPU torch build (see the Makefile); the benchmark needs only the base classes."""
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None:
            raise SystemExit("mosaicml-streaming is not installed: pip install -e .[bench]")
        package = types.ModuleType("streaming")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = package
    import streaming.base as base
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    return base


def load_avg() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- datasets


def build_datasets(server: SeaweedS3, storage: StorageConfig, work: Path, p: dict) -> tuple:
    """The moeops dataset and the same tokens as MDS, both on the server. Returns (manifest, mds
    remote URI, figures)."""
    row_len = p["seq_len"] + 1
    rows_per_shard = p["shard_mb"] * MB // (4 * row_len)
    shards = max(2, round(p["gib"] * GIB / (rows_per_shard * row_len * 4) + 0.4999))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        arrays = list(
            pool.map(lambda k: synthetic_shard(rows_per_shard, row_len, 1000 + k), range(shards))
        )
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = commit_token_dataset(
        join(storage.cold_uri, "tokens"), {"train": arrays}, p["seq_len"], VOCAB, storage, workers=2
    )
    commit_s = time.perf_counter() - t0

    base = import_streaming()
    remote = f"s3://{server.bucket}/bench-mds"
    t0 = time.perf_counter()
    with base.MDSWriter(
        out=(str(work / "mds-out"), remote),
        columns={"tokens": f"ndarray:int32:{row_len}"},
        compression="zstd:1",
        size_limit=p["shard_mb"] * MB,
        max_workers=2,
    ) as writer:
        for rows in arrays:
            for row in rows:
                writer.write({"tokens": row})
    mds_s = time.perf_counter() - t0
    token_bytes = sum(a.nbytes for a in arrays)
    return (
        manifest,
        remote,
        {
            "bench_bytes": token_bytes,
            "bench_gib": token_bytes / GIB,
            "bench_stored_bytes": sum(s.bytes for s in manifest.shards("train")),
            "shard_mb": p["shard_mb"],
            "shard_stored_mb": sum(s.bytes for s in manifest.shards("train")) / shards / MB,
            "shards": shards,
            "rows_per_shard": rows_per_shard,
            "samples": shards * rows_per_shard,
            "seq_len": p["seq_len"],
            "generate_s": generate_s,
            "commit_shards_s": commit_s,
            "write_mds_s": mds_s,
        },
    )


# ----------------------------------------------------------------------------- measurements


def epoch(reader: TieredReader) -> tuple[float, int]:
    t0 = time.perf_counter()
    samples = sum(b.shape[0] for b in reader)
    return time.perf_counter() - t0, samples


def bench_s3(manifest, storage: StorageConfig, server: SeaweedS3, connections: int) -> dict:
    """The server's limit (N connections, ranged GETs, nothing else) and sequential s3fs +
    decode."""
    import boto3

    shards = manifest.shards("train")
    stored = sum(s.bytes for s in shards)
    part = storage.part_mb * MB
    bucket = server.bucket
    keys = [manifest.shard_uri(s)[len(f"s3://{bucket}/") :] for s in shards]
    work = [
        (key, start, min(start + part, s.bytes) - 1)
        for key, s in zip(keys, shards)
        for start in range(0, s.bytes, part)
    ]
    local = threading.local()

    def get(item) -> int:
        if not hasattr(local, "client"):
            local.client = boto3.session.Session().client(
                "s3",
                endpoint_url=server.endpoint,
                region_name="us-east-1",
                aws_access_key_id=server.access_key,
                aws_secret_access_key=server.secret_key,
            )
        key, lo, hi = item
        body = local.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi}")["Body"]
        n = 0
        while chunk := body.read(1 << 20):
            n += len(chunk)
        return n

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(get, work[:connections]))  # connections and clients up before timing
        t0 = time.perf_counter()
        fetched = sum(pool.map(get, work))
        limit_s = time.perf_counter() - t0
    assert fetched == stored, (fetched, stored)

    fs, _ = filesystem_for(manifest.uri, storage)
    t0 = time.perf_counter()
    rows = 0
    for s in shards:
        rows += decode_shard(
            fs.cat_file(manifest.shard_uri(s)[len("s3://") :]), manifest.row_len
        ).shape[0]
    sequential_s = time.perf_counter() - t0
    return {
        "s3_limit_mb_per_s": stored / MB / limit_s,
        "s3_limit_connections": connections,
        "s3_limit_s": limit_s,
        "s3_sequential_mb_per_s": stored / MB / sequential_s,
        "s3_sequential_samples_per_s": rows / sequential_s,
        "cold_sequential_samples_per_s": rows / sequential_s,
        "cold_sequential_mb_per_s": stored / MB / sequential_s,
    }


def bench_cold(manifest, storage_for, batch_size: int, block: int) -> dict:
    stored = sum(s.bytes for s in manifest.shards("train"))
    reader = TieredReader(
        manifest.uri,
        "train",
        storage_for("cold"),
        batch_size=batch_size,
        shuffle_block_shards=block,
    )
    elapsed, samples = epoch(reader)
    stats = reader.stats()
    reader.close()
    filler = TieredReader(
        manifest.uri,
        "train",
        storage_for("fill-only"),
        batch_size=batch_size,
        shuffle_block_shards=block,
    )
    fill = filler.fill_warm()
    filler.close()
    return {
        "cold_samples_per_s": samples / elapsed,
        "cold_mb_per_s": stored / MB / elapsed,
        "cold_s": elapsed,
        "cold_parallel_samples_per_s": samples / elapsed,
        "cold_parallel_mb_per_s": stored / MB / elapsed,
        "cold_shards_ahead": stats["shards_ahead"],
        "cold_shard_load_s": stats["shard_load_s"],
        "cold_fill_only_mb_per_s": fill["bytes_cold"] / MB / fill["seconds"],
    }


def raw_pyarrow_epoch(
    files: list[str], row_len: int, batch_size: int, seed: int, block: int
) -> int:
    """What a user would write without moeops: ``ParquetFile.read`` of the local files in
    RAW_THREADS threads (reading the next block while the current one is gathered), then the
    reader's gather: the rows of each block of ``block`` consecutive files in one seeded random
    order (the reader's shuffle block), batches of ``batch_size`` widened to int64 torch tensors.
    Returns the samples delivered (whole batches per block)."""
    rng = np.random.default_rng(seed)

    def read(path: str) -> np.ndarray:
        table = pq.ParquetFile(path).read(use_threads=False)
        column = table.column(0)
        chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        return chunk.to_numpy(zero_copy_only=True).reshape(-1, row_len)  # int32[R, row_len]

    blocks = [files[i : i + block] for i in range(0, len(files), block)]
    samples = 0
    with ThreadPoolExecutor(RAW_THREADS) as pool:
        ahead = [pool.submit(read, f) for f in blocks[0]]
        for i in range(len(blocks)):
            parts = [future.result() for future in ahead]
            if i + 1 < len(blocks):
                ahead = [pool.submit(read, f) for f in blocks[i + 1]]
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)  # int32[R_block, L]
            order = rng.permutation(len(rows))
            for lo in range(0, len(order) - batch_size + 1, batch_size):
                batch = torch.from_numpy(rows[order[lo : lo + batch_size]]).long()  # [B, L]
                samples += batch.shape[0]
    return samples


def bench_warm(manifest, storage: StorageConfig, batch_size: int, repeats: int, block: int) -> dict:
    """The warm tier (filled by bench_cold) vs plain pyarrow and raw bytes of the same files."""
    shards = manifest.shards("train")
    stored = sum(s.bytes for s in shards)
    probe = TieredReader(manifest.uri, "train", storage, batch_size=batch_size)
    files = [probe.cache.shard_path(s.sha256) for s in shards]
    probe.close()
    assert all(os.path.exists(f) for f in files), "the warm tier is not filled"
    best = {
        "warm": float("inf"),
        "warm_no_hot": float("inf"),
        "raw_bytes": float("inf"),
        "raw_pyarrow": float("inf"),
    }
    samples = raw_rows = 0
    for attempt in range(repeats):  # interleaved, best of n: the machine is shared
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(8 * MB):
                    pass
        best["raw_bytes"] = min(best["raw_bytes"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        raw_rows = raw_pyarrow_epoch(
            [str(f) for f in files], manifest.row_len, batch_size, attempt, block
        )
        best["raw_pyarrow"] = min(best["raw_pyarrow"], time.perf_counter() - t0)
        for key, prefetch in (("warm", None), ("warm_no_hot", 0)):
            reader = TieredReader(
                manifest.uri,
                "train",
                storage,
                batch_size=batch_size,
                prefetch_batches=prefetch,
                shuffle_block_shards=block,
            )
            elapsed, samples = epoch(reader)
            reader.close()
            best[key] = min(best[key], elapsed)
    warm_s = min(best["warm"], best["warm_no_hot"])
    return {
        "warm_samples_per_s": samples / warm_s,
        "warm_mb_per_s": stored / MB / warm_s,
        "warm_reader_samples_per_s": samples / warm_s,
        "warm_reader_mb_per_s": stored / MB / warm_s,
        "warm_hot_on_samples_per_s": samples / best["warm"],
        "warm_hot_off_samples_per_s": samples / best["warm_no_hot"],
        "raw_pyarrow_samples_per_s": raw_rows / best["raw_pyarrow"],
        "raw_pyarrow_mb_per_s": stored / MB / best["raw_pyarrow"],
        "raw_pyarrow_threads": RAW_THREADS,
        "raw_bytes_mb_per_s": stored / MB / best["raw_bytes"],
        "raw_bytes_samples_per_s": raw_rows / best["raw_bytes"],
        "warm_vs_raw_ratio": (samples / warm_s) / (raw_rows / best["raw_pyarrow"]),
        "warm_vs_raw_bytes_ratio": (samples / warm_s) / (raw_rows / best["raw_bytes"]),
    }


def bench_streaming(
    remote: str, work: Path, batch_size: int, seed: int, rows_per_shard: int, block: int
) -> dict:
    """mosaicml-streaming on the same tokens, set up as its docs advise for throughput: a torch
    DataLoader with STREAMING_WORKERS persistent worker processes (moeops reads with threads in one
    process; on 2 cores either side gets the same CPUs) and a shuffle block of ``block`` shards'
    rows, the reader's ``data.shuffle_block_shards`` (streaming's own default, 262,144 samples,
    would span every shard here and wait for all of them).
    Cold epoch (remote -> local cache), then the warm epoch on the same workers."""
    import boto3
    from torch.utils.data import DataLoader

    base = import_streaming()

    # its samples are read-only views of the memory-mapped shard; collate copies them anyway
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    # a block of one shard (--shuffle-block-shards 1) is smaller than streaming likes: it warns
    warnings.filterwarnings("ignore", message="Shuffle block size was smaller than shard size")

    # The index goes into the local cache first, as a launcher's local rank 0 would put it: a
    # StreamingDataset that downloads it itself makes its S3 client in this process, and the
    # DataLoader's forked workers then share that client's pooled keep-alive socket. Two
    # processes reading one socket stall for botocore's 60 s read timeout (measured: 2 of 4
    # --quick runs at 8-shard blocks, where both workers fetch at once). Without the parent's
    # client each worker makes its own. The shards are still fetched remote -> local below.
    local = work / "mds-cache"
    local.mkdir(parents=True, exist_ok=True)
    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).download_file(
        bucket, f"{prefix}/index.json", str(local / "index.json")
    )
    dataset = base.StreamingDataset(
        remote=remote,
        local=str(local),
        shuffle=True,
        shuffle_seed=seed,
        shuffle_block_size=rows_per_shard * block,
        batch_size=batch_size,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=STREAMING_WORKERS,
        persistent_workers=True,
        drop_last=True,
    )
    out = {}
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        samples = 0
        for batch in loader:
            tokens = batch["tokens"].long()  # what training gets from moeops: LongTensor[B, L]
            samples += tokens.shape[0]
        elapsed = time.perf_counter() - t0
        out[f"streaming_{name}_samples_per_s"] = samples / elapsed
        out[f"streaming_{name}_s"] = elapsed
    out["streaming_samples"] = samples
    out["streaming_workers"] = STREAMING_WORKERS
    out["streaming_shuffle_block"] = rows_per_shard * block
    del loader, dataset
    return out


def bench_data_wait(
    manifest, storage_for, batch_size: int, steps: int, compute_dim: int, block: int
) -> dict:
    """Steady state (warm tier filled) and cold start (empty warm tier), hot prefetch on and off."""
    a = torch.randn(compute_dim, compute_dim)
    out = {}
    for start, tag in (("", "cold"), ("_cold_start", None)):
        for name, prefetch in (("on", None), ("off", 0)):
            storage = storage_for(tag or f"wait-{name}")
            reader = TieredReader(
                manifest.uri,
                "train",
                storage,
                batch_size=batch_size,
                prefetch_batches=prefetch,
                shuffle_block_shards=block,
            )
            batches = reader.iter_steps()
            wait, startup_wait = 0.0, 0.0
            t_start = time.perf_counter()
            for i in range(WARMUP_STEPS + steps):
                if i == WARMUP_STEPS:  # the pipeline's one-time fill is reported on its own
                    startup_wait, wait, t_start = wait, 0.0, time.perf_counter()
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                for _ in range(2):
                    (a @ a).sum().item()  # the "model step"
                _ = batch.sum()
                reader.mark_step(i + 1)
            total = time.perf_counter() - t_start
            batches.close()
            reader.close()
            out[f"data_wait_fraction_prefetch_{name}{start}"] = wait / total
            out[f"step_ms_prefetch_{name}{start}"] = 1000 * total / steps
            out[f"startup_wait_s_prefetch_{name}{start}"] = startup_wait
    out["data_wait_shards_crossed"] = (
        (WARMUP_STEPS + steps) * batch_size / manifest.shards("train")[0].rows
    )
    return out


def bench_prepare(storage: StorageConfig, text_mb: float, repeats: int) -> dict:
    """The prepare stage's chunk work (tokenize + pack + write shards to the cold tier) vs HF
    tokenizers' encode_batch on the same text, in the same batches, nothing else."""
    data = DataConfig(
        name="bench-prepare",
        max_files=100_000,
        max_bytes=int(text_mb * MB),
        vocab_size=4096,
        seq_len=2048,
        val_fraction=0.0,
        seed=1,
    )
    docs = list_corpus(data, storage)
    texts = [t for d in docs for t in read_documents(d, storage, data.text_field)]
    sample, size = [], 0
    for text in texts:  # the tokenizer is trained on 1 MB (not measured)
        sample.append(text)
        size += len(text)
        if size > MB:
            break
    tok = TextTokenizer.train(iter(sample), vocab_size=data.vocab_size)
    encode = getattr(tok._tok, "encode_batch_fast", tok._tok.encode_batch)  # the library itself
    chunks = plan_chunks(docs, 4 * MB)  # several chunks: the stage's unit of work
    limit_s = prepare_s = float("inf")
    for attempt in range(repeats):  # interleaved, best of n: the machine is shared
        t0 = time.perf_counter()
        tokens = sum(
            len(e.ids)
            for batch in text_batches(texts)
            for e in encode(batch, add_special_tokens=False)
        )
        limit_s = min(limit_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        written = 0
        for i, chunk in enumerate(chunks):
            entries = build_chunk(
                i,
                [asdict(d) for d in chunk],
                tok.to_str(),
                join(storage.cold_uri, f"prepare-{attempt}"),
                data,
                storage,
            )
            written += sum(e["rows"] for e in entries)
        prepare_s = min(prepare_s, time.perf_counter() - t0)
    tokens_out = tokens + len(texts)  # each document also gets its EOS
    return {
        "prepare_text_mb": sum(len(t) for t in texts) / MB,
        "prepare_tokens": tokens_out,
        "tokenizer_limit_tokens_per_s": tokens / limit_s,
        "prepare_tokens_per_s": tokens_out / prepare_s,
        "prepare_rows_written": written,
        "prepare_vs_tokenizer_limit_ratio": (tokens_out / prepare_s) / (tokens / limit_s),
    }


# ----------------------------------------------------------------------------- main

HEADLINE = (
    "bench_bytes",
    "shard_mb",
    "warm_vs_raw_ratio",
    "cold_vs_s3_limit_ratio",
    "cold_parallel_vs_sequential_ratio",
    "warm_vs_streaming_ratio",
    "cold_vs_streaming_ratio",
    "data_wait_fraction_prefetch_on",
    "data_wait_fraction_prefetch_off",
    "prepare_vs_tokenizer_limit_ratio",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="json_out", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="small smoke run (tens of MB)")
    parser.add_argument(
        "--gib", type=float, help="GiB of tokens in the shards (default 1, --quick 0.03)"
    )
    parser.add_argument(
        "--shard-mb", type=int, help="shard size, MiB of tokens (default: data.shard_mb)"
    )
    parser.add_argument(
        "--connections", type=int, help="parallel connections of the S3 limit (default 8)"
    )
    parser.add_argument(
        "--shuffle-block-shards",
        dest="block",
        type=int,
        help="shards whose rows are shuffled together (default: data.shuffle_block_shards)",
    )
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    p.setdefault("shard_mb", DataConfig().shard_mb)
    p.setdefault("block", DataConfig().shuffle_block_shards)
    for key in ("gib", "shard_mb", "connections", "block"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    torch.set_num_threads(1)
    # a SIGTERM (timeout, kill) unwinds like Ctrl-C, so the server is stopped and the GiBs removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    results: dict = {
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "load_1m_start": load_avg(),
        "batch_size": p["batch_size"],
        "shuffle_block_shards": p["block"],
    }
    work = Path(tempfile.mkdtemp(prefix="moeops-bench-data-"))
    server = SeaweedS3(work / "s3")
    saved_env = {k: os.environ.get(k) for k in [*server.env(), "S3_ENDPOINT_URL"]}
    os.environ.update(server.env())
    os.environ["S3_ENDPOINT_URL"] = server.endpoint  # mosaicml-streaming's way to name the endpoint
    server.start()
    try:

        def storage_for(tag: str) -> StorageConfig:
            return server.storage(
                "bench",
                warm_dir=str(work / f"warm-{tag}"),
                warm_limit_bytes=4 * GIB,
                retries=3,
                backoff_base_s=0.05,
                backoff_max_s=1.0,
            )

        def phase(name: str, fn, *a):
            t0 = time.perf_counter()
            out = fn(*a)
            results[f"phase_{name}_s"] = time.perf_counter() - t0
            print(
                f"[bench_data] {name}: {results[f'phase_{name}_s']:.1f}s (load {load_avg():.1f})",
                flush=True,
            )
            return out

        manifest, mds_remote, figures = phase(
            "build", build_datasets, server, storage_for("build"), work, p
        )
        results.update(figures)
        results.update(phase("s3", bench_s3, manifest, storage_for("s3"), server, p["connections"]))
        results.update(
            phase("cold", bench_cold, manifest, storage_for, p["batch_size"], p["block"])
        )
        results.update(
            phase(
                "warm",
                bench_warm,
                manifest,
                storage_for("cold"),
                p["batch_size"],
                p["repeats"],
                p["block"],
            )
        )
        results.update(
            phase(
                "streaming",
                bench_streaming,
                mds_remote,
                work,
                p["batch_size"],
                0,
                figures["rows_per_shard"],
                p["block"],
            )
        )
        results.update(
            phase(
                "data_wait",
                bench_data_wait,
                manifest,
                storage_for,
                p["wait_batch"],
                p["wait_steps"],
                p["compute_dim"],
                p["block"],
            )
        )
        results.update(
            phase("prepare", bench_prepare, storage_for("prepare"), p["text_mb"], p["repeats"])
        )
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)  # GiBs of shards, caches and server data
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # the cold fill (cold -> warm tier: fetch, sha256, atomic write) against the same bytes fetched
    # doing nothing else; the whole cold epoch (plus decoding and batching) is reported too
    results["cold_vs_s3_limit_ratio"] = (
        results["cold_fill_only_mb_per_s"] / results["s3_limit_mb_per_s"]
    )
    results["cold_epoch_vs_s3_limit_ratio"] = (
        results["cold_mb_per_s"] / results["s3_limit_mb_per_s"]
    )
    results["cold_parallel_vs_sequential_ratio"] = (
        results["cold_samples_per_s"] / results["cold_sequential_samples_per_s"]
    )
    results["warm_vs_streaming_ratio"] = (
        results["warm_samples_per_s"] / results["streaming_warm_samples_per_s"]
    )
    results["cold_vs_streaming_ratio"] = (
        results["cold_samples_per_s"] / results["streaming_cold_samples_per_s"]
    )
    results["load_1m_end"] = load_avg()
    results["uptime"] = f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    results["total_s"] = time.perf_counter() - started
    for key in HEADLINE:
        print(
            f"{key}: {results[key]:.3f}"
            if isinstance(results[key], float)
            else f"{key}: {results[key]}"
        )
    print(f"total_s: {results['total_s']:.0f} ({results['uptime']})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
