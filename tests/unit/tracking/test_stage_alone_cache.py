"""A stage run on its own (``python -m pipelines.train``: its functions live in ``__main__``) has
the same code key as inside ``pipelines.run``, and the training run's checkpoint identity follows
the code, so a code change trains new weights instead of resuming the old run's final checkpoint.

As in test_code_cache.py, a copy of the code runs in a subprocess with the real stage specs and
stand-in stage functions; the standalone run goes through ``runpy.run_module(..., "__main__")``,
the mechanism of ``python -m``, with the Hydra entry point swapped for one that runs the spec it is
given. The router edit is a statement, not a comment.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from fixtures.code_copy import run_rounds

DRIVER = textwrap.dedent('''
    import dataclasses, json, runpy, sys
    from pathlib import Path

    import components
    from components.config import load_config
    from components.training.ray_runner import training_name
    from fixtures import stage_fakes
    from pipelines import _cli
    from pipelines.pipeline import run_pipeline
    from pipelines.run import selected_specs

    ROOT = Path(__file__).resolve().parent
    assert Path(components.__file__).resolve().is_relative_to(ROOT), components.__file__

    def fake_train(ctx):
        # the name the real stage gives its Ray Train run (pipelines/train.py does the same call)
        name = training_name(ctx.config, "/m.json", code=ctx.code_digest)
        return stage_fakes.train(ctx, checkpoint_uri=name)

    FAKES = {**stage_fakes.FAKES, "train": fake_train}

    config = load_config(sys.argv[1:])

    def outcome(stage):
        return {"reused": stage.reused, "reason": stage.reason,
                "checkpoint": stage.outputs.checkpoint_uri}

    def pipeline():
        specs = [dataclasses.replace(s, fn=FAKES[s.name], still_valid=None)
                 for s in selected_specs(config)]
        return outcome(run_pipeline(config, specs).stages["train"])

    def alone(stage):
        """``python -m pipelines.<stage>``: the module runs as __main__, its main() is called."""
        seen = {}

        def stage_main(spec):
            def main():
                seen["fn_module"] = spec.fn.__module__
                seen["module"] = spec.module
                fake = dataclasses.replace(spec, fn=FAKES[spec.name], still_valid=None)
                seen.update(outcome(run_pipeline(config, [fake]).stages[spec.name]))
            return main

        _cli.stage_main = stage_main
        runpy.run_module(f"pipelines.{stage}", run_name="__main__", alter_sys=True)
        return seen

    rounds = {"pipeline": pipeline(), "alone": alone("train")}
    with open(ROOT / "components/model/router.py", "a") as f:
        f.write("\\n\\nEDITED_BY_THE_TEST = 1\\n")
    rounds["alone_after_edit"] = alone("train")
    rounds["pipeline_after_edit"] = pipeline()
    print("ROUNDS " + json.dumps(rounds))
''')


def test_a_stage_alone_keys_its_code_as_in_the_pipeline_and_new_code_trains_anew(tmp_path):
    rounds = run_rounds(tmp_path, DRIVER)
    first, alone, edited, again = (
        rounds[k] for k in ("pipeline", "alone", "alone_after_edit", "pipeline_after_edit")
    )

    # run as a script the stage's functions live in __main__, yet its code is pipelines.train's
    assert alone["fn_module"] == "__main__" and alone["module"] == "pipelines.train"
    assert first["reused"] is False
    assert alone["reused"] is True, alone["reason"]

    # a statement added to the router: the stage alone retrains, under a new checkpoint identity
    assert edited["reused"] is False
    assert edited["reason"] == "code changed (components.model.router)", edited["reason"]
    assert edited["checkpoint"] != first["checkpoint"]
    assert edited["checkpoint"].startswith("train-")
    # ... and the pipeline then reuses that run: the same key on both paths
    assert again["reused"] is True and again["checkpoint"] == edited["checkpoint"]


def test_the_train_stage_names_its_run_with_the_code_digest():
    """The real stage passes its code digest to ``training_name`` (the fake above mirrors it)."""
    import ast

    source = (Path(__file__).resolve().parents[3] / "pipelines" / "train.py").read_text()
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "training_name"
    ]
    assert calls and all(
        any(k.arg == "code" and ast.unparse(k.value) == "ctx.code_digest" for k in c.keywords)
        for c in calls
    )


def test_training_name_needs_and_follows_the_code_digest():
    import pytest

    from components.config import load_config
    from components.training.ray_runner import training_name

    config = load_config(["experiment=tiny"])
    assert training_name(config, "/m", code="a") == training_name(config, "/m", code="a")
    assert training_name(config, "/m", code="a") != training_name(config, "/m", code="b")
    with pytest.raises(ValueError, match="code digest"):
        training_name(config, "/m", code="")
