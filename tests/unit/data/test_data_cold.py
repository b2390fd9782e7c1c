from __future__ import annotations

import pytest

from components.config.schema import StorageConfig
from components.data.cold import (
    ColdStorageError,
    backoff_delay,
    filesystem_for,
    is_transient,
    with_retries,
)

STORAGE = StorageConfig(retries=3, backoff_base_s=0.001, backoff_max_s=0.002)


def test_transient_errors_are_retried_then_succeed():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    retried = []
    assert (
        with_retries(
            flaky,
            what="shard train/a",
            uri="s3://b/a",
            storage=STORAGE,
            on_retry=lambda attempt, exc: retried.append(attempt),
        )
        == b"ok"
    )
    assert len(calls) == 3 and retried == [0, 1]


def test_after_last_retry_the_error_names_what_and_uri():
    def down():
        raise TimeoutError("read timed out")

    with pytest.raises(
        ColdStorageError, match=r"shard train/x.*s3://bucket/ds/train/x.*4 attempts"
    ):
        with_retries(down, what="shard train/x", uri="s3://bucket/ds/train/x", storage=STORAGE)


def test_permanent_errors_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, what="m", uri="/x", storage=STORAGE)
    assert len(calls) == 1


def test_classification_and_backoff_bounds():
    class ServerError(Exception):
        response = {"ResponseMetadata": {"HTTPStatusCode": 503}}

    class ClientError(Exception):
        response = {"ResponseMetadata": {"HTTPStatusCode": 403}}

    assert is_transient(ServerError()) and not is_transient(ClientError())
    assert is_transient(ConnectionRefusedError()) and not is_transient(PermissionError())
    for attempt in range(10):
        assert 0 <= backoff_delay(attempt, 0.1, 2.0) <= min(2.0, 0.1 * 2**attempt)


def test_bad_uris_give_clear_errors():
    with pytest.raises(ColdStorageError, match="empty URI"):
        filesystem_for("")
    with pytest.raises(ColdStorageError, match="nosuchproto"):
        filesystem_for("nosuchproto://bucket/x")


def test_storage_must_be_the_typed_section():
    with pytest.raises(TypeError, match="StorageConfig"):
        filesystem_for("/tmp/x", {"retries": 1})
    fs, path = filesystem_for("s3a://bucket/ds/manifest.json")  # no section: the schema's defaults
    assert path == "bucket/ds/manifest.json" and "s3" in fs.protocol
