"""Where a run came from: code version and working-tree state."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import components

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_tags() -> dict[str, str]:
    """Git commit (``$MOEOPS_GIT_COMMIT`` where no .git is shipped, e.g. ``ray job submit``),
    dirty flag and package version."""
    commit = _git("rev-parse", "HEAD") or os.environ.get("MOEOPS_GIT_COMMIT", "unknown")
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {
        "mlflow.source.git.commit": commit,
        "moeops.git_commit": commit,
        "moeops.git_dirty": os.environ.get("MOEOPS_GIT_DIRTY", dirty) if status is None else dirty,
        "moeops.version": components.__version__,
    }
