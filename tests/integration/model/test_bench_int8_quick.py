"""The int8 benchmark's --quick smoke run writes every figure bench_serve.py merges, sane ones.

In process (``main`` with argv, the CLI path included): the torch import and its first
optimiser's one-off imports are then shared with the rest of the session."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[3]


def test_bench_int8_quick(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_int8", ROOT / "tests/benchmarks/bench_int8.py"
    )
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_int8", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    out = tmp_path / "bench-int8.json"
    bench.main(["--quick", "--json", str(out)])
    assert torch.get_num_threads() == threads  # the benchmark restores what it changed
    result = json.loads(out.read_text())
    for key in (
        "int8_vs_fp32_speed_ratio",
        "int8_vs_fp32_speed_ratio_compute_bound",
        "int8_vs_fused_fp32_speed_ratio",
        "moe_small.decode.cpu_ratio",
        "fp32_perplexity",
        "int8_perplexity",
        "moe_tiny.decode.fp32_tokens_per_s",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    # the headline against a loose floor (the goal): int8 GEMMs at moe_small's layer sizes beat the
    # same fused float GEMMs. Healthy: 3.3-3.6 over three quick runs at load 16-19 (3.8 at load 12).
    # Broken, an int8 path that fell back to float (quantize_for_inference patched to return the
    # fused float twin, in a scratch copy of this quick run): 0.98 and 1.02.
    assert result["int8_vs_fused_fp32_speed_ratio_compute_bound"] >= 1.5, result
    # a few training steps only (docs/quantization.md has the trained figure), but int8 must not
    # move the logits: within the check's bounds (components/model/quantize_check.py)
    assert result["int8_perplexity_abs_change_pct"] <= 2
    assert result["int8_top1_agreement"] >= 0.9
    assert result["auto_int8.moe_tiny"] == 0 and result["auto_int8.moe_small"] == 1
