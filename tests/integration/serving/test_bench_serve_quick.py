"""The serving benchmark's smoke run: it starts its own Ray + Serve and writes the named figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(600)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("batched_vs_unbatched_rps_ratio_c32", "p99_ms_c32_batched", "serve_overhead_ms_p50",
                "int8_vs_fp32_speed_ratio", "int8_perplexity_change_pct"):
        assert isinstance(figures[key], float), key
    for c in (1, 8, 32):
        for mode in ("batched", "unbatched"):
            assert figures[f"rps_c{c}_{mode}"] > 0 and figures[f"errors_c{c}_{mode}"] == 0
