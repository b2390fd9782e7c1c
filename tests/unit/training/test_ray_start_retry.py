"""The test fixtures' Ray start retry: a start-up timeout is retried after the attempt's processes
are
killed; any other error is raised at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fixtures.ray_start import start_with_retries


def test_a_timed_out_start_is_cleaned_up_and_retried():
    left_behind: list[subprocess.Popen] = []

    def start():
        if not left_behind:  # the first attempt starts a "raylet" and times out
            left_behind.append(
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            )
            raise Exception(
                "The current node timed out during startup. This could happen because ..."
            )
        return "up"

    assert start_with_retries(start, log=lambda line: None) == "up"
    import psutil

    # killed (and reaped) before the second attempt; it would sleep for a minute
    assert not psutil.pid_exists(left_behind[0].pid)


def test_other_errors_are_not_retried():
    calls = []

    def start():
        calls.append(1)
        raise ValueError("bad argument")

    with pytest.raises(ValueError):
        start_with_retries(start, log=lambda line: None)
    assert len(calls) == 1
