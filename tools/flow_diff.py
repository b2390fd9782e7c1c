"""Compare two training runs' data-flow reports: did they train on exactly the same batches?

    python -m tools.flow_diff A B [--tracking-uri URI]

``A`` and ``B`` are each an MLflow run id of a train stage run (its artifact
``data_flow/flow_report.json``), a report file, or a directory holding ``flow_report.json`` (a
training checkpoint, an export directory).  Steps are compared by their global fingerprint, which
does not depend on the world size (:mod:`components.data.flow`), so a run resumed at another
world size can be checked against an uninterrupted one.

Exit code 0: every step's global batch is the same; 1: they differ (the first differing step,
its ranks, stream positions and shards are printed); 2: a report cannot be found or read.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from components.data.flow import REPORT_FILE, describe, first_difference, global_steps, load_report

ARTIFACT_PATH = f"data_flow/{REPORT_FILE}"  # where the train stage logs the report on its run
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReportNotFound(Exception):
    """The argument names no readable data-flow report."""


def _tracking_uri(explicit: str | None) -> str:
    if explicit:
        return explicit
    from components.config.compose import default_tracking_uri

    return default_tracking_uri()  # $MLFLOW_TRACKING_URI, else the project's default sqlite store


def resolve_report(ref: str, tracking_uri: str | None = None) -> tuple[list[dict], str]:
    """(report entries, where they came from) for a file, a directory or an MLflow run id."""
    path = Path(ref)
    if path.is_dir():
        for candidate in (path / REPORT_FILE, path / ARTIFACT_PATH):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ReportNotFound(f"{ref}: directory holds no {REPORT_FILE}")
    if path.is_file():
        try:
            return load_report(path), str(path)
        except ValueError as err:
            raise ReportNotFound(str(err)) from err
    if not _RUN_ID.match(ref):
        raise ReportNotFound(
            f"{ref!r} is neither a report file, a directory with {REPORT_FILE}, "
            "nor an MLflow run id (32 hex characters)"
        )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = _tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        client.get_run(ref)
    except MlflowException as err:
        raise ReportNotFound(f"run {ref} not found in the tracking store {uri}") from err
    with tempfile.TemporaryDirectory(prefix="moeops-flow-") as tmp:
        try:
            local = client.download_artifacts(ref, ARTIFACT_PATH, tmp)
        except (MlflowException, OSError) as err:
            raise ReportNotFound(
                f"run {ref} has no artifact {ARTIFACT_PATH} (is it a train stage run that "
                f"finished?): {err}"
            ) from err
        try:
            return load_report(local), f"run {ref} ({uri})"
        except ValueError as err:
            raise ReportNotFound(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.flow_diff",
        description="Compare two runs' data-flow reports step by step and name the first step "
        "whose global batch differs. Exit 0: identical; 1: different; 2: a report is missing.",
    )
    parser.add_argument(
        "a",
        metavar="A",
        help="MLflow run id of a train run, a flow_report.json, or a directory with one",
    )
    parser.add_argument("b", metavar="B", help="the run or report to compare with")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for run ids (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    args = parser.parse_args(argv)
    try:
        a, where_a = resolve_report(args.a, args.tracking_uri)
        b, where_b = resolve_report(args.b, args.tracking_uri)
    except ReportNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    steps_a, steps_b = global_steps(a), global_steps(b)
    if not steps_a or not steps_b:
        empty = where_a if not steps_a else where_b
        print(f"error: {empty} has no per-step batch fingerprints", file=sys.stderr)
        return 2
    print(
        f"A: {where_a}: steps {min(steps_a)}-{max(steps_a)}, world size "
        f"{sorted({s.world_size for s in steps_a.values()})}"
    )
    print(
        f"B: {where_b}: steps {min(steps_b)}-{max(steps_b)}, world size "
        f"{sorted({s.world_size for s in steps_b.values()})}"
    )
    diff = first_difference(a, b)
    if diff is None:
        print(f"same batches at every step ({len(steps_a)} steps)")
        return 0
    print(describe(diff))
    return 1


if __name__ == "__main__":
    sys.exit(main())
