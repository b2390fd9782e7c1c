"""The installed torch is the build the Makefile pins (README: "torch is pinned to 2.13.0")."""

from __future__ import annotations

import os
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]


def makefile_torch_spec() -> str:
    """The requirement `make setup` installs under its constraints file, as make itself expands it
    (a TORCH_SPEC in the environment overrides the Makefile's, as it does for the install)."""
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO), "torch-spec"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=True,
    )
    return result.stdout.strip()


def test_installed_torch_is_the_pinned_build():
    spec = Requirement(makefile_torch_spec())
    assert spec.name == "torch", spec
    installed = Version(version("torch"))
    pins = [s for s in spec.specifier if s.operator in ("==", "===")]
    if pins:  # an exact pin: the very build, local label (+cpu, +cu128) included
        assert installed == Version(pins[0].version), (
            f"installed torch {installed}, the Makefile pins {spec}"
        )
    else:
        assert spec.specifier.contains(installed, prereleases=True), (
            f"installed torch {installed} not in {spec}"
        )


def test_the_pin_is_within_pyprojects_range():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = next(Requirement(d) for d in dependencies if Requirement(d).name == "torch")
    pinned = Requirement(makefile_torch_spec())
    for pin in pinned.specifier:
        if pin.operator == "==":
            assert torch_range.specifier.contains(Version(pin.version).public), (
                pinned,
                torch_range,
            )
