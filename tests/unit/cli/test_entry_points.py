"""The command lines users type: --help, and bad configs failing before Ray or MLflow start.

Every command runs as ``python -m pipelines.<module>`` does (``runpy.run_module`` as
``__main__``, its own argv, its stdout and stderr file descriptors captured, its own working and
home directory), all of them in one fresh interpreter: each separate interpreter would import
torch and MLflow again, seconds apiece on the loaded 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ENTRY_POINTS = ["run", "prepare", "tune", "train", "evaluate", "register", "deploy"]
BAD = ("model.top_k=65", "serve.canary_fraction=2")
CASES = {
    "help": ("run", "--help"),
    "unknown-key": ("run", "model.expertz=4"),
    **{f"bad-{module}": (module, *BAD) for module in ENTRY_POINTS},
}

DRIVER = r"""
import json, os, runpy, sys, tempfile, traceback
base, cases = sys.argv[1], json.loads(sys.argv[2])
results = {}
for name, (module, *args) in cases.items():
    cwd = os.path.join(base, name)
    os.makedirs(cwd)
    os.chdir(cwd)
    os.environ["HOME"] = cwd
    sys.argv = [f"pipelines/{module}.py", *args]
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            runpy.run_module(f"pipelines.{module}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        out.seek(0)
        err.seek(0)
        results[name] = {"returncode": code, "stdout": out.read(), "stderr": err.read(), "cwd": cwd}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("entry-points")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(base), json.dumps(CASES)],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(base)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_lists_groups_and_keys(cli):
    result = cli["help"]
    assert result["returncode"] == 0, result["stderr"]
    for group in (
        "data:",
        "storage:",
        "model:",
        "train:",
        "tune:",
        "serve:",
        "tracking:",
        "cluster:",
        "experiment:",
    ):
        assert group in result["stdout"]
    assert "top_k" in result["stdout"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_bad_config_fails_before_any_work(module, cli):
    result = cli[f"bad-{module}"]
    stdout, stderr = result["stdout"], result["stderr"]
    assert result["returncode"] == 2, stdout + stderr
    assert "model.top_k=65: must be between 1 and model.num_experts (64)" in stderr
    assert "serve.canary_fraction=2.0: must be in [0, 1]" in stderr
    assert "Traceback" not in stderr
    # Nothing was started or written: no MLflow store, no Ray session, no state dir.
    cwd = Path(result["cwd"])
    assert not (cwd / "mlflow.db").exists() and not (cwd / ".moeops" / "stages").exists()
    assert "[ray]" not in stdout


def test_unknown_key_fails_at_composition(cli):
    result = cli["unknown-key"]
    assert result["returncode"] != 0
    assert "model.expertz" in result["stderr"] + result["stdout"]
    assert not (Path(result["cwd"]) / "mlflow.db").exists()
