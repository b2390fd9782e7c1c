"""The data benchmark's --quick run starts its own S3, builds both datasets (moeops shards and
mosaicml-streaming MDS) and produces every named figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from components.config.schema import DataConfig

pytestmark = [pytest.mark.benchmark, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]
RATIOS = (
    "warm_vs_raw_ratio",
    "cold_vs_s3_limit_ratio",
    "cold_parallel_vs_sequential_ratio",
    "warm_vs_streaming_ratio",
    "cold_vs_streaming_ratio",
    "data_wait_fraction_prefetch_on",
    "prepare_vs_tokenizer_limit_ratio",
)
RAW = (
    "warm_samples_per_s",
    "warm_mb_per_s",
    "raw_pyarrow_samples_per_s",
    "raw_pyarrow_mb_per_s",
    "raw_bytes_mb_per_s",
    "cold_samples_per_s",
    "cold_mb_per_s",
    "cold_fill_only_mb_per_s",
    "s3_limit_mb_per_s",
    "cold_sequential_samples_per_s",
    "streaming_cold_samples_per_s",
    "streaming_warm_samples_per_s",
    "prepare_tokens_per_s",
    "tokenizer_limit_tokens_per_s",
    "data_wait_fraction_prefetch_off",
)


# its own SeaweedFS and shards of 2049-token rows: ~25 s
@pytest.mark.slow
def test_bench_data_quick(tmp_path):
    out = tmp_path / "bench-data.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/benchmarks/bench_data.py"),
            "--quick",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in (*RATIOS, *RAW):
        assert math.isfinite(result[key]) and result[key] > 0, key
    for key in RATIOS:
        assert f"{key}: " in proc.stdout  # the headline figures are printed too
    assert 0 < result["data_wait_fraction_prefetch_on"] < 1
    # the same tokens on both sides: as many (whole-batch) samples per epoch for moeops as for
    # streaming
    assert (
        result["streaming_samples"]
        == result["samples"] // result["batch_size"] * result["batch_size"]
    )
    # headline figures against loose floors. warm_vs_raw measured 0.47-0.74 at this size with
    # one-shard blocks and 0.55 with 8 (16 MB, an epoch of ~50 ms, so fixed costs and the
    # per-sample fingerprints weigh more than at 1 GiB, where it is 0.72 / 1.41); a reader that
    # decodes its shard again for every batch measured 0.08 here. The streaming ratios measured
    # 2.7-8.9 (that broken reader: 0.99 against streaming).
    assert result["warm_vs_raw_ratio"] >= 0.25, result["warm_vs_raw_ratio"]
    assert result["warm_vs_streaming_ratio"] >= 1.0
    assert result["cold_vs_streaming_ratio"] >= 1.0
    assert "load average" in result["uptime"]
    # every side shuffles in the main job's blocks: the reader, the raw gather and streaming
    block = DataConfig().shuffle_block_shards
    assert result["shuffle_block_shards"] == block
    assert result["streaming_shuffle_block"] == result["rows_per_shard"] * block
