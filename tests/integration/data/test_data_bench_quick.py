"""The data benchmark's --quick smoke run starts its own S3 and produces every named figure."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.benchmark, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]


def test_bench_data_quick(tmp_path):
    out = tmp_path / "bench-data.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/benchmarks/bench_data.py"), "--quick", "--json", str(out)],
                          check=True, cwd=ROOT, timeout=300, capture_output=True, text=True)
    result = json.loads(out.read_text())
    for key in ("warm_vs_raw_ratio", "cold_parallel_vs_sequential_ratio", "data_wait_fraction_prefetch_on",
                "data_wait_fraction_prefetch_off", "warm_reader_samples_per_s", "raw_pyarrow_mb_per_s",
                "cold_parallel_mb_per_s", "cold_sequential_samples_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
        if key.endswith("ratio") or key.startswith("data_wait"):
            assert key in proc.stdout  # the ratios are printed too
    assert 0 < result["data_wait_fraction_prefetch_on"] < 1
