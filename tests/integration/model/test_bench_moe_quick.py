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
    subprocess.run([sys.executable, str(ROOT / "tests/benchmarks/bench_moe.py"), "--quick", "--json", str(out)],
                   check=True, cwd=ROOT, timeout=300)
    result = json.loads(out.read_text())
    for key in ("moe_vs_dense_ratio", "moe_vs_naive_ratio", "overlap_on_vs_off_step_ratio", "exposed_comm_fraction"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    for variant in ("on", "off"):
        breakdown = result["expert_parallel_step"][variant]
        parts = breakdown["compute_s"] + breakdown["a2a_exposed_s"] + breakdown["allreduce_s"] + breakdown["data_wait_s"]
        assert parts == pytest.approx(breakdown["step_s"], rel=0.05)
        assert breakdown["a2a_exposed_s"] > 0
