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
        "moe_vs_dense_ratio_cpu_time",
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
    # the headline (MoE layer vs a dense MLP of equal active FLOPs) against a loose floor, by the
    # least CPU time of 15 interleaved rounds, which the load of the shared machine moves least.
    # Healthy: the median figure 0.47-0.66 over seven quick runs at load 16-34 (3 or 15 rounds);
    # this best-of one 0.49-0.53 (two quick runs at load 31-34, four scratch runs at 30-45). Broken,
    # every token through all 8 experts (top_k=8 in the same timing loop, 4x the dense FLOPs):
    # 0.17-0.19. The overlap figures are not floored: at this size on 2 loaded cores on/off swung
    # from 0.71 to 1.07 between two runs.
    ratio = result["moe_vs_dense_ratio_cpu_time_best"]
    assert ratio >= 0.3, ratio
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
