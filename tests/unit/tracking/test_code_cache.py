"""Code-aware caching: a stage's cache key covers the project code it runs.

The acceptance test edits modules of a *copy* of the code and runs the real stage specs (their
real modules, config slices and upstream wiring) with cheap stand-in functions in a subprocess
that imports the copy: editing the router re-runs train and what follows (tune too, which trains
with it), editing only the serving app re-runs only deploy, and a comment changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from components.tracking.code import code_closure, imports_of, module_file
from fixtures.code_copy import REPO, run_rounds

STAGES = ("prepare", "tune", "train", "evaluate", "register", "deploy")

DRIVER = textwrap.dedent('''
    """Runs the pipeline's real stage specs with stand-in functions, editing code between runs."""
    import dataclasses, json, sys
    from pathlib import Path

    import components
    from components.config import load_config
    from fixtures.stage_fakes import FAKES
    from pipelines.pipeline import run_pipeline
    from pipelines.run import selected_specs

    ROOT = Path(__file__).resolve().parent
    assert Path(components.__file__).resolve().is_relative_to(ROOT), components.__file__

    config = load_config(sys.argv[1:])
    specs = [
        dataclasses.replace(s, fn=FAKES[s.name], still_valid=None) for s in selected_specs(config)
    ]

    def run():
        result = run_pipeline(config, specs)
        return {name: [o.reused, o.reason] for name, o in result.stages.items()}

    def append(path, text):
        with open(ROOT / path, "a") as f:
            f.write(text)

    rounds = {"first": run()}
    append("components/model/router.py", "\\n\\ndef _edited_by_the_test():\\n    return 1\\n")
    rounds["router"] = run()
    append("serving/app.py", "\\n\\ndef _edited_by_the_test():\\n    return 2\\n")
    rounds["serving"] = run()
    append("components/model/router.py", "\\n# only a comment\\n")
    rounds["comment"] = run()
    print("ROUNDS " + json.dumps(rounds))
''')


def test_editing_code_reruns_exactly_the_stages_that_run_it(tmp_path):
    rounds = run_rounds(tmp_path, DRIVER)

    assert all(
        reason == "no earlier run" and not reused for reused, reason in rounds["first"].values()
    )

    router = rounds["router"]
    assert router["prepare"] == [True, ""], "prepare does not run the model code"
    for stage in ("tune", "train", "evaluate", "register", "deploy"):
        reused, reason = router[stage]
        assert not reused and "code changed (components.model.router)" in reason, (stage, reason)
    assert "input changed (train)" in router["evaluate"][1]

    serving = rounds["serving"]
    assert [s for s in STAGES if not serving[s][0]] == ["deploy"]
    assert serving["deploy"][1] == "code changed (serving.app)"

    assert all(reused for reused, _ in rounds["comment"].values()), "a comment is not a code change"


def test_closures_follow_lazy_imports_and_import_paths():
    prepare, train, deploy = (
        code_closure([f"pipelines.{s}"]) for s in ("prepare", "train", "deploy")
    )
    assert not any(m.startswith(("components.model", "serving")) for m in prepare)
    # run_training imports the training loop inside the function
    assert {"components.training.loop", "components.model.router", "pipelines.train"} <= set(train)
    assert "serving.app" in deploy and not any(m.startswith("serving") for m in train)
    # parent packages' __init__ run on import, so they count
    assert {"components", "components.model", "pipelines"} <= set(train)


def test_import_forms_are_resolved(tmp_path):
    import ast

    pkg = tmp_path / "serving"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("")
    (pkg / "b.py").write_text("")
    source = textwrap.dedent("""
        import components.config
        from . import a
        from .b import thing
        def lazy():
            from components.model import router
        TARGET = "serving.app:build_app"
        NOT_AN_IMPORT = "serving.app"
        import numpy
    """)
    found = imports_of(ast.parse(source), "serving.x", False, root=tmp_path)
    assert found == {
        "components.config",
        "serving",
        "serving.a",
        "serving.b",
        "components.model",
        "serving.app",
    }
    assert module_file("serving.a", tmp_path) == pkg / "a.py"
    assert module_file("serving", tmp_path) == pkg / "__init__.py"


@pytest.mark.parametrize(
    "stage", ["prepare", "deploy"]
)  # the smallest closure and the one reaching serving/
def test_modules_loaded_by_importing_a_stage_are_in_its_closure(stage):
    """The static walk misses nothing the interpreter actually loads when the stage module is
    imported."""
    probe = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('pipelines', "
        "'components', 'serving'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, f"pipelines.{stage}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert loaded <= set(code_closure([f"pipelines.{stage}"]))
