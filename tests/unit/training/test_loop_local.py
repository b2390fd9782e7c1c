"""The training loop in one process (no Ray): loss falls, and stop + resume replays the same
curve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from components.config import load_config
from components.training.loop import LocalSession, RunInfo, train
from fixtures.tiny import SMALL_DATA

TINY = [
    *SMALL_DATA,  # the session's small_dataset is prepared with these
    "model.dim=32",
    "model.ffn_dim=64",
    "train.num_workers=1",
    "train.expert_parallel_size=1",
    "tune.trial_num_workers=1",
    "train.batch_size=4",
    "train.eval_every=1",
    "train.eval_batches=1",
    "train.log_every=100",
    "train.warmup_steps=2",
    "train.checkpoint_every=3",
    "storage.hot_prefetch_batches=2",
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, small_dataset):
    """The session's prepared SMALL_DATA set, not one more tokenizer training and encoding."""
    return tmp_path_factory.mktemp("loop-data"), small_dataset.manifest


def run(
    root: Path, manifest, tag: str, overrides: list[str], resume_dir: str | None = None
) -> LocalSession:
    cfg = load_config(
        [*TINY, f"paths.root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *overrides]
    )
    session = LocalSession(root / tag, resume_dir=resume_dir)
    train(cfg, RunInfo(manifest.uri, manifest.vocab_size, manifest.seq_len), session)
    return session


def test_stop_and_resume_reproduce_the_uninterrupted_curve(tiny_dataset):
    root, manifest = tiny_dataset
    straight = run(root, manifest, "straight", ["train.max_steps=6"])
    losses = {int(r["step"]): r["loss"] for r in straight.reports}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]  # it learns
    final = straight.reports[-1]
    assert (
        1.0 <= final["moe/load_max_over_mean"] <= 8.0 and 0.0 <= final["moe/dropped_fraction"] < 1.0
    )
    assert math.isnan(final["comm/exposed_fraction"])  # one process: no all-to-all to expose
    assert final["skipped_steps"] == 0.0 and final["grad_norm"] > 0

    first = run(root, manifest, "first", ["train.max_steps=6", "train.stop_at_step=3"])
    assert [int(r["step"]) for r in first.reports] == [1, 2, 3]
    assert first.checkpoints[-1].endswith("step_0000003")
    second = run(root, manifest, "second", ["train.max_steps=6"], resume_dir=first.checkpoints[-1])
    assert [int(r["step"]) for r in second.reports] == [4, 5, 6]
    assert second.reports[0]["start_step"] == 3
    for report in first.reports + second.reports:
        step = int(report["step"])
        # same data order, weights, Adam moments, schedule and RNG: the same numbers
        assert report["loss"] == pytest.approx(losses[step], rel=1e-6, abs=1e-6), step
    assert second.reports[-1]["val_loss"] == pytest.approx(
        straight.reports[-1]["val_loss"], rel=1e-6
    )
    # the data-flow report of every checkpoint covers every step so far; the resumed run's final one
    # carries the first segment's steps and fingerprints the same batches as the uninterrupted run
    from components.data.flow import first_difference, global_steps, load_report

    straight_flow = load_report(Path(straight.checkpoints[-1]) / "flow_report.json")
    resumed_flow = load_report(Path(second.checkpoints[-1]) / "flow_report.json")
    assert (
        sorted(global_steps(straight_flow))
        == sorted(global_steps(resumed_flow))
        == [1, 2, 3, 4, 5, 6]
    )
    assert sorted(global_steps(load_report(Path(first.checkpoints[-1]) / "flow_report.json"))) == [
        1,
        2,
        3,
    ]
    assert first_difference(straight_flow, resumed_flow) is None
