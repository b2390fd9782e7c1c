"""The serving benchmark's smoke run: it starts its own Ray + Serve and writes every named figure.

A subprocess: the benchmark starts (and shuts down) a Ray instance of its own, which must not meet
the test session's. Figures are checked for being sane numbers, not against the goals (those are
measured by the full run and reported in docs/serving.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(600)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"

POSITIVE = (
    "serve_floor_ms_p50",
    "serve_floor_fastapi_ms_p50",
    "app_healthz_ms_p50",
    "http_ms_p50_c1",
    "inprocess_ms_p50_c1",
    "short_alone_ms_p50",
    "short_behind_long_ms_p50",
    "short_behind_long_latency_ratio",
    "rps_c32_batched",
    "rps_c32_unbatched",
    "batched_vs_unbatched_rps_ratio_c32",
    "decode_tokens_per_s_c32",
    "inprocess_tokens_per_s_b32",
    "decode_vs_inprocess_ratio_c32",
    "int8_vs_fp32_speed_ratio",
    "int8_vs_fp32_speed_ratio_compute_bound",
)


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in POSITIVE:
        assert (
            isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0
        ), (key, figures.get(key))
    # the overhead is a difference of two noisy medians: finite, and smaller than the HTTP request
    # itself
    assert math.isfinite(figures["serve_overhead_ms_p50"])
    assert figures["serve_overhead_ms_p50"] < figures["http_ms_p50_c1"]
    assert math.isfinite(figures["int8_perplexity_change_pct"])
    # the raw figures agree with their ratios
    assert figures["batched_vs_unbatched_rps_ratio_c32"] == pytest.approx(
        figures["rps_c32_batched"] / figures["rps_c32_unbatched"], rel=1e-2
    )
    assert figures["decode_vs_inprocess_ratio_c32"] == pytest.approx(
        figures["decode_tokens_per_s_c32"] / figures["inprocess_tokens_per_s_b32"], rel=1e-2
    )
    for mode in ("batched", "unbatched"):
        assert figures[f"errors_c32_{mode}"] == 0 and figures[f"requests_c32_{mode}"] > 0
    assert figures["load_1m_start"] >= 0 and "load average" in figures["uptime"]
