"""The cold tier: any fsspec URI (local path, ``file://``, ``s3://``, ``gs://``...).

One helper builds the filesystem from the ``storage`` config (:func:`filesystem_for`), one
retries transient faults with exponential backoff and jitter (:func:`with_retries`), and
:func:`write_atomic` makes sure nothing is ever partially committed:

- local filesystems: write ``<path>.tmp-<random>``, then ``os.replace`` (atomic rename);
- object stores: a single PUT of the whole object, which S3/GCS make visible atomically
  (readers see the old object or the new one, never a prefix of it).

Datasets commit by writing their manifest last, so a crash mid-``prepare`` leaves shards
nobody references, never a manifest that points at missing bytes.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import fsspec.core
from fsspec.implementations.local import LocalFileSystem

from components.config.schema import StorageConfig

T = TypeVar("T")

# Failures that retrying cannot fix: the object is not there, we may not read it, the URI is wrong.
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
)
# Names of transient errors raised by botocore / aiohttp / gcsfs that are not OSError subclasses.
_TRANSIENT_NAME_PARTS = (
    "Connection",
    "Timeout",
    "Throttl",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "IncompleteRead",
    "ResponseParserError",
    "HTTPClientError",
    "ClientPayloadError",
    "ServerDisconnected",
    "ResponseStreamingError",
    "ProtocolError",
)


class ColdStorageError(IOError):
    """The cold tier failed for good (after all retries) or the URI cannot be used."""


def storage_or_default(storage: StorageConfig | None) -> StorageConfig:
    """The given ``storage`` section, or the schema's defaults when there is none."""
    if storage is None:
        return StorageConfig()
    if not isinstance(storage, StorageConfig):
        raise TypeError(
            "storage must be a StorageConfig (components.config.schema), got "
            f"{type(storage).__name__}; "
            "on a Ray worker rebuild it with components.config.config_from_dict"
        )
    return storage


def split_protocol(uri: str) -> tuple[str, str]:
    """``s3://b/k`` -> ("s3", "b/k"); a plain path -> ("file", path)."""
    protocol, path = fsspec.core.split_protocol(uri)
    return protocol or "file", path


def filesystem_for(
    uri: str, storage: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` plus the path inside it.

    S3 options come from the storage config: ``endpoint_url``, ``region`` and credentials from the
    environment variables it names (``access_key_env`` / ``secret_key_env``); botocore's own retries
    are turned off so that :func:`with_retries` alone decides how long to keep trying.
    """
    if not uri:
        raise ColdStorageError(
            "empty URI: expected a local path or an fsspec URI such as s3://bucket/prefix"
        )
    st = storage_or_default(storage)
    protocol, path = split_protocol(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        client_kwargs: dict[str, Any] = {}
        if st.endpoint_url:
            client_kwargs["endpoint_url"] = st.endpoint_url
        if st.region:
            client_kwargs["region_name"] = st.region
        key = os.environ.get(st.access_key_env or "AWS_ACCESS_KEY_ID")
        secret = os.environ.get(st.secret_key_env or "AWS_SECRET_ACCESS_KEY")
        if key and secret:
            options.update(key=key, secret=secret)
        options.update(
            client_kwargs=client_kwargs,
            config_kwargs={
                "retries": {"max_attempts": 1, "mode": "standard"},
                "connect_timeout": 5,
                "read_timeout": 60,
            },
        )
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise ColdStorageError(
            f"{uri!r}: no usable fsspec filesystem for protocol {protocol!r}: {exc}"
        ) from exc


def credential_env(storage: StorageConfig | None) -> dict[str, str]:
    """The credential variables the storage config names, as set here (to forward to Ray
    workers)."""
    st = storage_or_default(storage)
    names = [
        st.access_key_env or "AWS_ACCESS_KEY_ID",
        st.secret_key_env or "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ]
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, throttling and 5xx are worth retrying; a missing key is not."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = [cls.__name__ for cls in type(exc).__mro__]
    if any(part in name for name in names for part in _TRANSIENT_NAME_PARTS):
        return True
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status == 429
    # s3fs maps unknown botocore errors to a bare OSError; the cause tells us more.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return is_transient(cause)
    return type(exc) is OSError


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def backoff_delay(
    attempt: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt)] so retrying clients spread out."""
    cap = min(max_s, base_s * (2**attempt))
    return (rng or random).uniform(0.0, cap)


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    uri: str,
    storage: StorageConfig | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run ``fn``; retry transient errors ``storage.retries`` times with backoff and jitter.

    After the last attempt the raised :class:`ColdStorageError` names ``what`` (e.g. the shard)
    and the URI, and chains the last underlying error.
    """
    st = storage_or_default(storage)
    retries, base, cap = st.retries, st.backoff_base_s, st.backoff_max_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise ColdStorageError(
                    f"{what}: cold tier {uri!r} still failing after {retries + 1} attempts: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(backoff_delay(attempt, base, cap))
    raise AssertionError("unreachable")


def read_bytes(
    uri: str,
    storage: StorageConfig | None = None,
    what: str | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
    size: int | None = None,
) -> bytes:
    """Whole object from the cold tier, with retries.

    With ``size`` known (a shard's manifest entry) an object store object larger than
    ``storage.part_mb`` is fetched as concurrent ranged GETs: one connection per part, so a
    single large shard is not limited to one TCP stream's throughput.  On S3 those GETs run on
    blocking connections in threads (:mod:`components.data.s3_parts`), not on s3fs's one event loop.
    """
    st = storage_or_default(storage)
    fs, path = filesystem_for(uri, storage)
    part = st.part_mb * 1024**2
    if size is not None and split_protocol(uri)[0] in ("s3", "s3a"):
        from components.data.s3_parts import fetch_object

        def fetch() -> bytes:
            return fetch_object(path, size, st, part)

    elif size is None or size <= part or isinstance(fs, LocalFileSystem):

        def fetch() -> bytes:
            return fs.cat_file(path)

    else:
        starts = list(range(0, size, part))
        ends = [min(start + part, size) for start in starts]

        def fetch() -> bytes:
            # a length mismatch (the object changed) is caught by the caller's size/sha256 check
            return b"".join(fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise"))

    return with_retries(fetch, what=what or path, uri=uri, storage=storage, on_retry=on_retry)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem_for(uri, storage)
    return with_retries(lambda: fs.exists(path), what=path, uri=uri, storage=storage)


def write_atomic(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Publish ``data`` at ``uri`` all at once (see the module doc for how, per filesystem)."""
    fs, path = filesystem_for(uri, storage)

    def write() -> None:
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs.pipe_file(path, data)

    with_retries(write, what=path, uri=uri, storage=storage)
