"""One shard = one zstd Parquet file of packed token rows: column ``tokens``, fixed-size lists of
``seq_len + 1`` int32 (inputs ``row[:-1]``, targets ``row[1:]``).

Pages carry CRC32 checksums and are verified on decode, so a flipped byte in a warm copy is
caught even when the whole-file sha256 is not re-checked on open.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMN = "tokens"


class CorruptShardError(IOError):
    """A shard's bytes do not match its manifest entry (size, checksum or Parquet structure)."""


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_shard(rows: np.ndarray) -> bytes:
    """rows: int[R, L] -> Parquet bytes (deterministic for the same rows and pyarrow version)."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"a shard needs a non-empty 2-D array of rows, got shape {rows.shape}")
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.int32).reshape(-1), type=pa.int32())
    column = pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])
    table = pa.table({COLUMN: column})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3, write_statistics=False,
                   use_dictionary=False, write_page_checksum=True, store_schema=False)
    return buf.getvalue()


def decode_shard(source: bytes | str, row_len: int) -> np.ndarray:
    """Parquet bytes or a local path -> int32[R, row_len]; raises CorruptShardError on bad bytes."""
    try:
        src = pa.BufferReader(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        table = pq.read_table(src, columns=[COLUMN], use_threads=False, page_checksum_verification=True)
        column = table.column(COLUMN).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptShardError(f"unreadable shard: {type(exc).__name__}: {exc}") from exc
    if values.size != len(column) * row_len:
        raise CorruptShardError(f"shard rows are not {row_len} tokens long")
    return values.reshape(len(column), row_len)
