"""Build a dataset in the cold tier: tokenize, pack, split, write shards, then the manifest.

The work is split into chunks of whole corpus files (about one shard's worth of text, at least
``CHUNK_BYTES``; fixed by the corpus and the config, not by the parallelism, so the digest does not
depend on how many workers ran).  A chunk is tokenized in batches of about ``ENCODE_BATCH_BYTES``
of text straight into one int32 token stream (memory stays near the size of the chunk's tokens).
:func:`prepare_dataset` takes a ``map_fn`` so that ``pipelines/prepare.py`` can fan the chunks
out as Ray tasks while tests run them in-process with :func:`serial_map`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.config.schema import DataConfig, StorageConfig
from components.data.cold import join, storage_or_default, write_atomic
from components.data.corpus import DocFile, iter_texts, list_corpus, read_documents
from components.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    compute_digest,
    load_manifest,
    write_manifest,
)
from components.data.shards import encode_shard, sha256_bytes
from components.data.tokenizer import TextTokenizer

CHUNK_BYTES = 1 << 20
ENCODE_BATCH_BYTES = 2 << 20
TOKENIZER_SAMPLE_BYTES = 32_000_000
TOKEN_BYTES = 4  # int32 in the shards
# Data config keys that change the dataset's bytes (prepare_parallelism and name do not).
CONTENT_KEYS = (
    "source",
    "uri",
    "text_field",
    "max_files",
    "max_bytes",
    "vocab_size",
    "byte_fallback",
    "seq_len",
    "val_fraction",
    "rows_per_shard",
    "shard_mb",
    "seed",
)

MapFn = Callable[[Callable[..., Any], Sequence[dict]], list]


def serial_map(fn: Callable[..., Any], kwargs_list: Sequence[dict]) -> list:
    return [fn(**kw) for kw in kwargs_list]


@dataclass
class PrepareResult:
    manifest: Manifest
    reused: bool  # an identical dataset was already committed
    documents: int

    def outputs(self) -> dict[str, str]:
        m = self.manifest
        return {
            "manifest_uri": m.uri,
            "digest": m.dataset_digest,
            "dataset_digest": m.dataset_digest,
            "tokenizer_uri": m.tokenizer_uri,
            "tokenizer_hash": m.tokenizer_hash,
            "vocab_size": str(m.vocab_size),
            "seq_len": str(m.seq_len),
            "train_rows": str(m.rows("train")),
            "val_rows": str(m.rows("val")),
        }


def plan_chunks(docs: Sequence[DocFile], chunk_bytes: int = CHUNK_BYTES) -> list[list[DocFile]]:
    chunks: list[list[DocFile]] = [[]]
    size = 0
    for doc in docs:
        if chunks[-1] and size + doc.size > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(doc)
        size += doc.size
    return [c for c in chunks if c]


def shard_rows(data: DataConfig) -> int:
    """Rows per shard: ``data.rows_per_shard``, or as many as fit ``data.shard_mb`` of int32
    tokens."""
    if data.rows_per_shard > 0:
        return data.rows_per_shard
    return max(1, data.shard_mb * 1024**2 // (TOKEN_BYTES * (data.seq_len + 1)))


def chunk_bytes(data: DataConfig) -> int:
    """Corpus bytes per chunk: about one shard (a token is 3-4 bytes of text and 4 bytes in a
    shard)."""
    return max(CHUNK_BYTES, shard_rows(data) * (data.seq_len + 1) * TOKEN_BYTES)


def content_config(data: DataConfig) -> dict:
    return {k: getattr(data, k) for k in CONTENT_KEYS}


def dataset_key(data: DataConfig, docs: Sequence[DocFile], tokenizer_hash: str) -> str:
    h = hashlib.sha256()
    h.update(FORMAT.encode())
    h.update(json.dumps(content_config(data), sort_keys=True).encode())
    h.update(tokenizer_hash.encode())
    for d in docs:
        h.update(f"{d.uri}\0{d.size}\n".encode())
    return h.hexdigest()[:16]


def token_stream(token_lists: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """Documents' token ids joined into one int32 stream, each followed by EOS."""
    eos = np.array([eos_id], dtype=np.int32)
    parts = [part for tokens in token_lists for part in (np.asarray(tokens, dtype=np.int32), eos)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


def pack_rows(
    token_lists: Iterable[Sequence[int]] | np.ndarray, eos_id: int, row_len: int
) -> np.ndarray:
    """Documents joined with EOS, cut into rows of ``row_len`` tokens; the remainder is dropped.

    ``token_lists`` may also be a stream already joined by :func:`token_stream`."""
    stream = (
        token_lists if isinstance(token_lists, np.ndarray) else token_stream(token_lists, eos_id)
    )
    n_rows = len(stream) // row_len
    return stream[: n_rows * row_len].reshape(n_rows, row_len)


def text_batches(
    texts: Iterable[str], batch_bytes: int = ENCODE_BATCH_BYTES
) -> Iterator[list[str]]:
    """Documents grouped into batches of about ``batch_bytes`` (the tokenizer parallelises a
    batch)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_chunk(tok: TextTokenizer, texts: Iterable[str]) -> np.ndarray:
    """All documents as one int32 token stream with EOS after each, tokenized batch by batch."""
    parts = [token_stream(tok.encode_batch(batch), tok.eos_id) for batch in text_batches(texts)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


def split_rows(
    rows: np.ndarray, val_fraction: float, seed: int, chunk_index: int
) -> dict[str, np.ndarray]:
    """Deterministic train/val split of one chunk's rows (row order kept inside each split)."""
    n_val = int(round(len(rows) * val_fraction))
    is_val = np.zeros(len(rows), dtype=bool)
    if n_val:
        rng = np.random.default_rng([seed, chunk_index])
        is_val[rng.choice(len(rows), size=n_val, replace=False)] = True
    return {"train": rows[~is_val], "val": rows[is_val]}


def build_chunk(
    chunk_index: int,
    docs: list[dict],
    tokenizer_json: str,
    dataset_uri: str,
    data: DataConfig,
    storage: StorageConfig,
) -> list[dict]:
    """Tokenize, pack, split and write one chunk's shards; returns their manifest entries."""
    tok = TextTokenizer.from_str(tokenizer_json)
    texts = (t for d in docs for t in read_documents(DocFile(**d), storage, data.text_field))
    rows = pack_rows(tokenize_chunk(tok, texts), tok.eos_id, data.seq_len + 1)
    entries = []
    per = shard_rows(data)
    for split, split_rows_ in split_rows(rows, data.val_fraction, data.seed, chunk_index).items():
        for k, start in enumerate(range(0, len(split_rows_), per)):
            blob = encode_shard(split_rows_[start : start + per])
            name = f"{split}/part-{chunk_index:05d}-{k:04d}.parquet"
            write_atomic(join(dataset_uri, name), blob, storage)
            entries.append(
                {
                    "split": split,
                    "name": name,
                    "bytes": len(blob),
                    "rows": min(per, len(split_rows_) - start),
                    "sha256": sha256_bytes(blob),
                }
            )
    return entries


def prepare_dataset(
    data: DataConfig,
    storage: StorageConfig,
    map_fn: MapFn = serial_map,
    on_chunk_done: Callable[[int], None] | None = None,
) -> PrepareResult:
    """The whole prepare step; reuses an identical committed dataset instead of rewriting it."""
    storage = storage_or_default(storage)
    if not storage.cold_uri:
        raise ValueError("storage.cold_uri is empty: set it to a local directory or an fsspec URI")
    docs = list_corpus(data, storage)
    tok = TextTokenizer.train(
        iter_texts(docs, storage, data.text_field, TOKENIZER_SAMPLE_BYTES),
        vocab_size=data.vocab_size,
        byte_fallback=data.byte_fallback,
    )
    key = dataset_key(data, docs, tok.digest)
    dataset_uri = join(storage.cold_uri, f"{data.name}-{key}")
    try:
        existing = load_manifest(join(dataset_uri, MANIFEST_NAME), storage)
        if existing.tokenizer_hash == tok.digest:
            return PrepareResult(existing, reused=True, documents=len(docs))
    except FileNotFoundError:
        pass

    tokenizer_uri = join(dataset_uri, "tokenizer.json")
    write_atomic(tokenizer_uri, tok.to_str().encode("utf-8"), storage)
    chunks = plan_chunks(docs, chunk_bytes(data))
    jobs = [
        {
            "chunk_index": i,
            "docs": [asdict(d) for d in chunk],
            "tokenizer_json": tok.to_str(),
            "dataset_uri": dataset_uri,
            "data": data,
            "storage": storage,
        }
        for i, chunk in enumerate(chunks)
    ]
    results = map_fn(build_chunk, jobs)
    splits: dict[str, list[ShardInfo]] = {"train": [], "val": []}
    for i, entries in enumerate(results):
        for e in entries:
            splits[e.pop("split")].append(ShardInfo(**e))
        if on_chunk_done:
            on_chunk_done(i)
    for split, shards in splits.items():
        if not shards:
            raise ValueError(
                f"the corpus produced no {split!r} rows (documents={len(docs)}, "
                f"data.seq_len={data.seq_len}, "
                f"data.val_fraction={data.val_fraction}): raise data.max_bytes/max_files or lower "
                "seq_len"
            )
        shards.sort(key=lambda s: s.name)
    manifest = Manifest(
        root_uri=dataset_uri,
        dataset_digest=compute_digest(tok.digest, data.seq_len, splits),
        tokenizer_hash=tok.digest,
        tokenizer_uri=tokenizer_uri,
        vocab_size=tok.vocab_size,
        seq_len=data.seq_len,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        splits=splits,
        config=content_config(data),
        corpus={"documents": len(docs), "bytes": sum(d.size for d in docs), "chunks": len(chunks)},
    )
    write_manifest(manifest, storage)  # last: the commit point
    return PrepareResult(manifest, reused=False, documents=len(docs))
