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
