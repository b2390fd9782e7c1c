"""The MoE benchmark's --quick smoke run produces every named figure, its headline ones past
loose floors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[3]


def test_bench_moe_quick(tmp_path):
    out = tmp_path / "bench-moe.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/benchmarks/bench_moe.py"),
            "--quick",
            "--json",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    result = json.loads(out.read_text())
    for key in (
        "moe_vs_dense_ratio",
        "moe_vs_naive_ratio",
        "overlap_on_vs_off_step_ratio",
        "exposed_comm_fraction",
        "best_possible_on_vs_off_ratio",
        "grouped_mm_vs_loop_ratio",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    on, off = (result["expert_parallel_step"][v] for v in ("on", "off"))
    for breakdown in (on, off):
        assert 0 < breakdown["a2a_exposed_s"] <= breakdown["a2a_total_s"]
    assert 0 < result["exposed_comm_fraction"] <= 1
    # headline figures against loose floors (measured under load 11: the layer 2.2x the naive
    # per-expert loop; overlap on left 22 of 58 ms of all-to-all exposed, the step 0.71x). A
    # dispatch that loops like the naive reference measures ~1x; overlap that does not overlap
    # leaves as much all-to-all exposed as overlap off (~1x).
    assert result["moe_vs_naive_ratio"] >= 1.0, result["moe_vs_naive_ratio"]
    assert on["a2a_exposed_s"] < 0.8 * off["a2a_exposed_s"], (on, off)
    assert result["overlap_on_vs_off_step_ratio"] < 1.0
    # counted during real forwards: the one sync of expert parallelism, none for grouped_mm alone
    syncs = result["host_syncs"]
    assert syncs["expert_parallel_overlap_on"]["total"] == 1
    assert syncs["expert_parallel_overlap_off"]["total"] == 1
    assert syncs["single_rank_grouped_mm"]["total"] == 0 and syncs["single_rank_loop"]["total"] == 1
