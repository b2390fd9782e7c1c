"""The int8 benchmark's --quick smoke run writes every figure bench_serve.py merges, sane ones."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[3]


def test_bench_int8_quick(tmp_path):
    out = tmp_path / "bench-int8.json"
    subprocess.run([sys.executable, str(ROOT / "tests/benchmarks/bench_int8.py"), "--quick", "--json", str(out)],
                   check=True, cwd=ROOT, timeout=300)
    result = json.loads(out.read_text())
    for key in ("int8_vs_fp32_speed_ratio", "int8_vs_fp32_speed_ratio_compute_bound", "moe_small.decode.cpu_ratio",
                "fp32_perplexity", "int8_perplexity", "moe_tiny.decode.fp32_tokens_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert abs(result["int8_perplexity_change_pct"]) < 5  # a few training steps; int8 stays close anyway
    assert result["auto_int8.moe_tiny"] == 0 and result["auto_int8.moe_small"] == 1
    assert result["threads"] == 1 and result["load_average_1m_start"] >= 0
