"""Pure parts of the sweep/register stages: the promotion gate, search space, concurrency,
summary."""

from __future__ import annotations

import math

import pytest

from components.config import load_config
from components.evaluation.sweep_report import trials_frame, write_sweep_summary
from components.tracking.registry import decide_promotion, parse_model_uri
from pipelines.tune import max_concurrent_trials, search_space, sweep_name, trial_overrides


@pytest.mark.parametrize(
    "candidate, champion, mode, margin, expected",
    [
        (2.0, 3.0, "min", 0.0, True),  # lower loss wins
        (3.5, 3.0, "min", 0.0, False),  # higher loss refused
        (3.0, 3.0, "min", 0.0, False),  # a tie is not a win
        (2.98, 3.0, "min", 0.05, False),  # better, but not by the margin
        (2.9, 3.0, "min", 0.05, True),  # better by more than the margin
        (0.9, 0.8, "max", 0.05, True),  # accuracy-like metric: higher wins
        (0.7, 0.8, "max", 0.0, False),
        (2.0, None, "min", 0.5, True),  # no champion: the first version is promoted
        (float("nan"), 3.0, "min", 0.0, False),  # a broken candidate never is
    ],
)
def test_decide_promotion_both_directions(candidate, champion, mode, margin, expected):
    promote, reason = decide_promotion(
        candidate, champion, mode=mode, min_improvement=margin, metric="val_loss"
    )
    assert promote is expected
    assert reason.startswith("promoted: " if expected else "refused: ")


def test_decide_promotion_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='median'"):
        decide_promotion(1.0, 2.0, mode="median", min_improvement=0.0, metric="val_loss")


def test_parse_model_uri():
    assert parse_model_uri("models:/moe/3") == ("moe", "3", None)
    assert parse_model_uri("models:/moe@champion") == ("moe", None, "champion")
    with pytest.raises(ValueError, match="models:/<name>/<version>"):
        parse_model_uri("models:/moe")


def test_search_space_and_trial_overrides(root_overrides):
    config = load_config(
        root_overrides
        + [
            "experiment=tiny",
            # Hydra merges into the group's search space; "+" adds keys it does not have yet.
            "+tune.search_space={model.capacity_factor: {type: uniform, low: 1.0, high: 2.0},"
            " model.num_experts: {type: randint, low: 2, high: 4}}",
        ]
    )
    space = search_space(config.tune.search_space)
    assert set(space) == {"train.lr", "model.top_k", "model.capacity_factor", "model.num_experts"}
    lr = [space["train.lr"].sample() for _ in range(50)]
    assert all(1e-3 <= v <= 1e-2 for v in lr)
    assert {space["model.num_experts"].sample() for _ in range(200)} == {
        2,
        3,
        4,
    }  # high is inclusive
    overrides = trial_overrides(config)
    assert overrides["train.max_steps"] == config.tune.trial_max_steps
    assert overrides["train.num_workers"] == config.tune.trial_num_workers
    # the same config, data and code name the same sweep (so an interrupted one is restored); other
    # data or other code do not
    assert sweep_name(config, "d1", "c1") == sweep_name(config, "d1", "c1")
    assert sweep_name(config, "d1", "c1") != sweep_name(config, "d2", "c1")
    assert sweep_name(config, "d1", "c1") != sweep_name(config, "d1", "c2")


def test_concurrency_fits_the_cluster(root_overrides):
    config = load_config(
        root_overrides + ["experiment=tiny", "tune.num_samples=8", "tune.trial_num_workers=2"]
    )
    # each trial: 2 workers x 1 CPU + 0.5 for the trial's driver = 2.5 CPUs
    assert max_concurrent_trials(config, {"CPU": 4.0}) == 1
    assert max_concurrent_trials(config, {"CPU": 10.0}) == 4
    assert max_concurrent_trials(config, {"CPU": 100.0}) == 8  # never more than the samples
    with pytest.raises(RuntimeError, match="one trial needs 2.5 CPUs"):
        max_concurrent_trials(config, {"CPU": 2.0})
    explicit = load_config(root_overrides + ["experiment=tiny", "tune.max_concurrent_trials=3"])
    assert max_concurrent_trials(explicit, {"CPU": 0.0}) == 3


def test_bad_search_space_is_named(root_overrides):
    from components.config import ConfigError

    with pytest.raises(ConfigError, match="tune.search_space.model.nope: no such config key"):
        load_config(
            root_overrides
            + [
                "experiment=tiny",
                "+tune.search_space={model.nope: {type: uniform, low: 0, high: 1}}",
            ]
        )


def test_sweep_summary_files(tmp_path):
    rows = [
        {
            "trial_id": "a",
            "status": "completed",
            "steps": 10,
            "val_loss": 4.0,
            "param.train.lr": 0.003,
            "param.model.top_k": 2,
        },
        {
            "trial_id": "b",
            "status": "stopped_early",
            "steps": 5,
            "val_loss": 6.5,
            "param.train.lr": 0.9,
            "param.model.top_k": 1,
        },
        {
            "trial_id": "c",
            "status": "errored",
            "steps": 0,
            "val_loss": float("nan"),
            "param.train.lr": 0.01,
            "param.model.top_k": 2,
        },
    ]
    frame = trials_frame(rows, "val_loss", "min")
    assert list(frame["trial_id"]) == ["a", "b", "c"]  # best first, missing metric last
    files = write_sweep_summary(
        rows, "val_loss", "min", ["train.lr", "model.top_k"], ["train.lr"], tmp_path
    )
    assert files["csv"].read_text().splitlines()[0].startswith("trial_id,status")
    markdown = files["markdown"].read_text()
    assert "| a | completed | 10 | 4 |" in markdown and "stopped_early" in markdown
    assert files["plot"].stat().st_size > 1000 and files["plot"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "moe, dense, expected, says",
    [
        (4.80, 4.90, True, "better by 0.1"),  # beats its dense equivalent: the first champion
        (5.40, 4.93, False, "not better"),  # issue 16's make run: worse than dense, not promoted
        (4.90, 4.90, False, "not better"),  # a tie is not a win
        (4.80, float("nan"), False, "no dense baseline"),  # nothing measured: nothing to beat
    ],
)
def test_first_champion_must_beat_its_dense_baseline(moe, dense, expected, says):
    promote, reason = decide_promotion(
        moe, None, mode="min", min_improvement=0.0, metric="val_loss", dense_gate=(moe, dense)
    )
    assert promote is expected
    assert reason.startswith("promoted: " if expected else "refused: ") and says in reason
    # the gate only decides the first champion: against a champion the usual comparison holds
    promote, reason = decide_promotion(
        moe, 9.0, mode="min", min_improvement=0.0, metric="val_loss", dense_gate=(moe, dense)
    )
    assert promote is True and "champion val_loss=9" in reason


def test_first_champion_without_the_dense_gate_says_so():
    promote, reason = decide_promotion(
        2.0, None, mode="min", min_improvement=0.0, metric="val_loss"
    )
    assert promote is True and "dense-baseline gate is off" in reason


@pytest.mark.parametrize(
    "moe, dense, verdict",
    [(4.0, 4.2, "MoE won by 0.2000"), (5.396, 4.931, "MoE lost by 0.4650"), (4.0, math.nan, "")],
)
def test_evaluate_says_whether_and_by_how_much_the_moe_won(moe, dense, verdict):
    from pipelines.outputs import EvaluateOutputs

    nan = math.nan
    out = EvaluateOutputs("runs:/r/e", "w", "d", moe, 1.0, 1.0, dense, "", nan, nan, nan)
    assert out.dense_verdict() == verdict
    assert out.moe_minus_dense_val_loss == pytest.approx(moe - dense, nan_ok=True)
    assert (verdict in out.headline()) if verdict else ("dense" not in out.headline())


def test_register_outputs_say_why():
    from pipelines.outputs import RegisterOutputs

    _, reason = decide_promotion(
        4.0, None, mode="min", min_improvement=0.0, metric="val_loss", dense_gate=(4.0, 4.2)
    )
    out = RegisterOutputs("m", "1", "id", ["champion"], True, reason, "")
    assert out.why().startswith("no comparable champion") and "better by 0.2" in out.why()


def test_deploy_without_a_champion_says_why_the_first_version_was_not_promoted(
    tmp_path, new_mlflow_store
):
    """A first challenger that lost to its dense baseline leaves no champion: deploy fails before
    any Ray work, naming the registered version, the register stage's reason and the ways out."""
    from pipelines import deploy
    from pipelines.outputs import RegisterOutputs

    uri = new_mlflow_store(tmp_path / "mlflow.db")
    reason = "MoE lost to its dense equivalent by 0.0500 (registry.require_dense_win)"
    registered = RegisterOutputs(
        model_name="moeops-moe",
        model_version="1",
        model_id="m-1",
        aliases=["challenger"],
        promoted=False,
        reason=reason,
        previous_champion="",
    )

    class Context:  # the two things deploy reads before it would start Ray
        config = load_config([f"paths.root={tmp_path}", f"tracking.uri={uri}"])
        tracking_uri = uri

        def input(self, kind):
            assert kind is RegisterOutputs
            return registered

    with pytest.raises(LookupError) as err:
        deploy.run(Context())
    message = str(err.value)
    assert "models:/moeops-moe@champion does not exist yet" in message
    assert reason in message
    assert "serve.model_uri=models:/moeops-moe/1" in message
    assert "registry.require_dense_win=false" in message
