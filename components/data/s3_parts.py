"""Whole S3 objects fetched as concurrent ranged GETs on blocking connections.

s3fs runs every request of a process on one asyncio thread, which also parses every response
body in Python: measured on SeaweedFS on loopback (2 cores, loaded), its ``cat_ranges`` reached
about 100-125 MB/s where the same ranged GETs on 8 blocking botocore connections (socket reads
outside the GIL) reached 170-180 MB/s.  So the cold tier fetches shards of known size here:
parts of ``storage.part_mb`` on a shared pool of threads, one connection each.

botocore comes with s3fs (through aiobotocore), so this adds no dependency.  Its own retries are
off: :func:`components.data.cold.with_retries` decides, as for every other cold-tier call.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from components.config.schema import StorageConfig

MAX_CONNECTIONS = 16  # part GETs in flight per process, over all shards being fetched

_lock = threading.Lock()
_clients: dict[tuple, Any] = {}
_pool: ThreadPoolExecutor | None = None
_owner = os.getpid()  # a forked child starts afresh: the parent's pool threads do not exist there


def _forget_if_forked() -> None:
    global _pool, _owner
    if os.getpid() != _owner:
        _clients.clear()
        _pool, _owner = None, os.getpid()


def _client(storage: StorageConfig):
    """One thread-safe botocore S3 client per endpoint, region and credentials (cached)."""
    key_id = os.environ.get(storage.access_key_env or "AWS_ACCESS_KEY_ID")
    secret = os.environ.get(storage.secret_key_env or "AWS_SECRET_ACCESS_KEY")
    cache_key = (storage.endpoint_url, storage.region, key_id, secret)
    with _lock:
        _forget_if_forked()
        client = _clients.get(cache_key)
        if client is None:
            import botocore.session
            from botocore.config import Config

            credentials = (
                {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
                if key_id and secret
                else {}
            )
            client = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=storage.endpoint_url or None,
                region_name=storage.region or None,
                config=Config(
                    max_pool_connections=MAX_CONNECTIONS,
                    retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                ),
                **credentials,
            )
            _clients[cache_key] = client
        return client


def _part_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        _forget_if_forked()
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_CONNECTIONS, thread_name_prefix="moeops-s3-part")
        return _pool


def _get(client, bucket: str, key: str, lo: int, hi: int) -> bytes:
    """Bytes [lo, hi) of the object; a missing object or a denied read as the built-in errors."""
    from botocore.exceptions import ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi - 1}")
        return response["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise FileNotFoundError(f"s3://{bucket}/{key}") from exc
        if code in ("AccessDenied", "403", "Forbidden"):
            raise PermissionError(f"s3://{bucket}/{key}: {code}") from exc
        raise


def fetch_object(path: str, size: int, storage: StorageConfig, part_bytes: int) -> bytes:
    """``bucket/key`` (``size`` bytes, from the manifest) as parts of ``part_bytes`` fetched
    concurrently.  A short object shows as fewer bytes (the caller checks size and sha256)."""
    bucket, _, key = path.partition("/")
    client = _client(storage)
    bounds = [(lo, min(lo + part_bytes, size)) for lo in range(0, size, part_bytes)] or [(0, 0)]
    if len(bounds) == 1:
        return _get(client, bucket, key, *bounds[0]) if size else b""
    futures = [_part_pool().submit(_get, client, bucket, key, lo, hi) for lo, hi in bounds]
    return b"".join(f.result() for f in futures)
