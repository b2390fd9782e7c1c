from __future__ import annotations

import pytest

from fixtures.s3 import local_storage, prepare_small_dataset


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """(PrepareResult, storage dict) of a ~50-shard dataset in a local cold tier, built once."""
    root = tmp_path_factory.mktemp("data-small")
    storage = local_storage(root)
    return prepare_small_dataset(storage), storage
