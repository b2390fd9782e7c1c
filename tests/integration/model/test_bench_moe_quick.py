"""The MoE benchmark's --quick smoke run produces every named figure."""

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
    for variant in ("on", "off"):
        breakdown = result["expert_parallel_step"][variant]
        parts = (
            breakdown["compute_s"]
            + breakdown["a2a_exposed_s"]
            + breakdown["allreduce_s"]
            + breakdown["data_wait_s"]
        )
        assert parts == pytest.approx(breakdown["step_s"], rel=0.05)
        assert 0 < breakdown["a2a_exposed_s"] <= breakdown["a2a_total_s"]
    assert 0 < result["exposed_comm_fraction"] <= 1
    # part 3: activation memory falls with checkpointing; the compiled step was timed
    memory = result["activation_bytes_per_token"]
    assert memory["full"] < memory["selective"] < memory["none"]
    assert math.isfinite(result["compile_vs_eager_step_ratio"])
    assert result["compile_vs_eager_step_ratio"] > 0
    # counted during real forwards: the one sync of expert parallelism, none for grouped_mm alone
    syncs = result["host_syncs"]
    assert (
        result["host_syncs_per_moe_layer_forward"]
        == syncs["expert_parallel_overlap_on"]["total"]
        == 1
    )
    assert syncs["expert_parallel_overlap_off"]["total"] == 1
    assert syncs["single_rank_grouped_mm"]["total"] == 0 and syncs["single_rank_loop"]["total"] == 1
