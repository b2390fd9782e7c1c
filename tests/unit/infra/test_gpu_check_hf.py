"""infra/gpu_check_hf.py rehearsed on CPU (fp32: moeops and transformers agree token for token)
and its import footprint (only torch and components: the GPU check runs on a bare machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.gpu_check_hf import import_transformers, run_hf_checks

ROOT = Path(__file__).resolve().parents[3]
SMALL = dict(dim=64, n_layers=2, n_heads=2, ffn_dim=96, max_seq_len=128, num_experts=4)


def test_module_imports_only_torch_and_components():
    code = (
        "import sys, json; import infra.gpu_check_hf; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & {"transformers", "vllm", "mlflow", "ray", "serving", "pipelines"}
    assert {"torch", "components"} <= loaded


@pytest.mark.skipif(import_transformers() is None, reason="transformers not installed")
def test_run_hf_checks_on_cpu_agrees_token_for_token():
    models = {
        "moe_shared_bias": dict(
            SMALL, top_k=2, shared_expert=True, bias_balancing=True, init_std=0.1
        ),
        "top1": dict(SMALL, top_k=1, moe_layer_interval=2, init_std=0.1),
    }
    report = run_hf_checks("cpu", models=models, max_new_tokens=16)
    assert report["status"] == "ok" and report["dtype"] == "float32"
    json.dumps(report)  # what the GPU check writes to gpu-check.json
    for name, arch in (
        ("moe_shared_bias", "Ernie4_5_MoeForCausalLM"),
        ("top1", "Qwen2MoeForCausalLM"),
    ):
        hf = report["models"][name]["transformers"]
        assert hf["architecture"] == arch
        assert hf["identical_prompts"] == hf["prompts"] == 4
        assert hf["routing_flips"] == 0 and hf["tokenizer_same_ids"]
        assert hf["max_abs_logit_diff_prompt0"] < 1e-4
        assert all(len(p["moeops"]) > 0 for p in hf["per_prompt"])
        assert report["models"][name]["vllm"]["status"].startswith("skipped")
