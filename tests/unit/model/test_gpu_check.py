"""`make gpu-check` on a machine without CUDA: a clear message and exit status 2, before any
work."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "infra" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA: run `make gpu-check` itself"
)
def test_without_cuda_it_fails_clearly(capsys, tmp_path):
    out = tmp_path / "gpu-check.json"
    assert _gpu_check().main(["--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device visible" in err and "GPU node" in err
    assert not out.exists(), "nothing is measured without a GPU"


def test_bad_gpu_count_is_refused(capsys):
    assert _gpu_check().main(["--device", "cpu", "--gpus", "9"]) == 2
    assert "--gpus 9" in capsys.readouterr().err


def test_mfu_inputs_peak_by_device_name_and_flops_per_step():
    from components.config.schema import ModelConfig
    from components.model.transformer import Transformer

    gc = _gpu_check()
    assert gc.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gc.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gc.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gc.bf16_peak("Some Future GPU") is None  # no MFU rather than a wrong one
    cfg = ModelConfig(dim=32, n_heads=2, n_layers=2, ffn_dim=48, num_experts=4, top_k=2)
    model = Transformer(cfg, 64)
    tokens, seq = 256, 64
    expected = tokens * (6 * model.num_params(active=True) + 12 * 2 * 32 * seq)
    assert gc.step_flops(model, tokens, seq) == expected


def test_bare_mode_imports_no_ray_mlflow_or_pipelines():
    """--no-install: the check runs where only torch (and a few small wheels) exist."""
    import subprocess
    import sys

    code = (
        "import runpy, sys; sys.argv = ['gpu_check', '--help']\n"
        "try:\n    runpy.run_path('infra/gpu_check.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(tops & {'ray', 'mlflow', 'pipelines', 'serving'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
