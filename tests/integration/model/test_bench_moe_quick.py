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
    # the headline (MoE layer vs a dense MLP of equal active FLOPs) against a loose floor, by CPU
    # time, which the load of the shared machine moves least (measured 0.55 and 0.52 at loads 11
    # and 21; its wall-time twin 0.36 and 0.61). A layer that ran every token through all 8
    # experts would do 4x the dense FLOPs (top-2; that broken variant was not measured here). The
    # overlap figures are not floored: at this size on 2 loaded cores on/off swung from 0.71 to
    # 1.07 between two runs.
    assert result["moe_vs_dense_ratio_cpu_time"] >= 0.3, result["moe_vs_dense_ratio_cpu_time"]
    # part 3: activation memory falls with checkpointing; the compiled step was timed
    memory = result["activation_bytes_per_token"]
    assert memory["full"] < memory["selective"] < memory["none"]
    assert math.isfinite(result["compile_vs_eager_step_ratio"])
    assert result["compile_vs_eager_step_ratio"] > 0
    # counted during real forwards: the one sync of expert parallelism, none for grouped_mm alone
    syncs = result["host_syncs"]
    assert syncs["expert_parallel_overlap_on"]["total"] == 1
    assert syncs["expert_parallel_overlap_off"]["total"] == 1
    assert syncs["single_rank_grouped_mm"]["total"] == 0 and syncs["single_rank_loop"]["total"] == 1
