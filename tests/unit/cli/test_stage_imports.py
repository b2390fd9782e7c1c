"""Stages only call components: no stage module imports another stage's module (the Ray Train
runner lives in components/training, the dataset entity on PrepareOutputs), and command-line
tools that are not stages live outside pipelines/."""

from __future__ import annotations

import ast
from pathlib import Path

from components.tracking.code import imports_of

REPO = Path(__file__).resolve().parents[3]
STAGES = ("prepare", "tune", "train", "evaluate", "register", "deploy")


def test_no_stage_imports_another_stage():
    found = {}
    for stage in STAGES:
        path = REPO / "pipelines" / f"{stage}.py"
        imported = imports_of(ast.parse(path.read_text()), f"pipelines.{stage}", False, REPO)
        others = {f"pipelines.{s}" for s in STAGES if s != stage}
        if imported & others:
            found[stage] = sorted(imported & others)
    assert not found, found


def test_pipelines_holds_stages_and_their_runner_only():
    """Every module of pipelines/ besides the shared helpers is a stage (it declares a SPEC)."""
    helpers = {"__init__", "_cli", "outputs", "pipeline", "run", "runtime"}
    # merged from the hf work, not stages: the deploy stage's vLLM branch and the HF export CLI
    # (a command-line tool: tools/ is its place, left to its owner)
    helpers |= {"deploy_vllm", "export"}
    not_stages = [
        p.name
        for p in sorted((REPO / "pipelines").glob("*.py"))
        if p.stem not in helpers and "\nSPEC = StageSpec(" not in p.read_text()
    ]
    assert not not_stages, f"not stages (tools go to tools/ or infra/): {not_stages}"
