"""The GPU check's own checks, rehearsed on CPU with 2 gloo processes (what runs on GPUs is the
same code plus the CUDA-only figures): every check passes and the JSON carries the figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def test_gpu_check_rehearsal_on_cpu_passes(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infra/gpu_check.py"),
            "--device",
            "cpu",
            "--gpus",
            "2",
            "--quick",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and report["environment"]["processes"] == 2
    checks = report["checks"]
    assert set(checks) == {
        "full_model_step",
        "decode",
        "grouped_mm_equals_loop",
        "expert_parallel_matches_reference",
        "bf16_payloads",
        "host_syncs",
        "overlap_benchmark",
    }
    assert checks["host_syncs"]["counted"] == 1
    # EP=2: the layer's one sync is the documented split-size read, nothing else syncs
    assert checks["host_syncs"]["documented"] == {"ep_split_sizes": 1}
    assert checks["bf16_payloads"]["received_dtypes"] == ["torch.bfloat16"]
    assert set(checks["expert_parallel_matches_reference"]["variants"]) >= {
        "overlap_off_loop",
        "overlap_on_loop",
    }
    full = checks["full_model_step"]
    for name in ("moe", "dense"):  # CPU: no MFU, no peak memory, but a real step and its rate
        assert full[name]["tokens_per_s"] > 0 and full[name]["tflops_per_s"] > 0
        assert full[name]["mfu"] is None and full[name]["peak_memory_gb"] is None
        # the whole step's syncs (forward, chunked loss, backward): only documented ones (the
        # CPU runs the loop backend: its counts once per MoE layer; none in the dense model)
        debug = full[name]["sync_debug"]
        assert debug["undocumented"] == {} and debug["unexpected_sync"] is None, debug
        assert debug["documented"] == debug["expected"]
    assert full["moe"]["sync_debug"]["documented"] == {"loop_expert_counts": 2}
    # decode: bf16 and int8 through the serving path; int8 on the CPU says so
    decode = checks["decode"]
    assert decode["bf16"]["tokens_per_s"] > 0 and decode["int8"]["tokens_per_s"] > 0
    assert decode["int8"]["device"] == "cpu" and decode["int8"]["path"].startswith("int8-")
    assert decode["int8"]["reason"] and decode["int8"]["cpu_fp32_tokens_per_s"] > 0
    # equal active parameters (dense equivalent), more total in the MoE
    assert full["moe"]["params_active"] == pytest.approx(full["dense"]["params_active"], rel=0.05)
    assert full["moe"]["params_total"] > full["dense"]["params_total"]
    assert report["hf"]["status"] == "skipped: CPU rehearsal"  # infra/gpu_check_hf on GPUs only
    assert report["environment"]["torch"] == report["environment"]["torch"].strip()
    bench = checks["overlap_benchmark"]
    assert bench["on"]["a2a_exposed_s"] <= bench["on"]["a2a_total_s"] and bench["off"]["step_s"] > 0
