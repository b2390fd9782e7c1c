"""Per-batch fingerprints: the same for the same seed and data, moved by one changed token, the
same for a run stopped and resumed (at the same or another world size) as for one that never
stopped; ``python -m tools.flow_diff`` names the first differing step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.data.flow import batch_entries, first_difference, global_steps, merge_reports
from components.data.reader import TieredReader
from fixtures.s3 import local_storage
from fixtures.token_data import commit_token_dataset, synthetic_rows
from tools.flow_diff import main as flow_diff

ROOT = Path(__file__).resolve().parents[3]
SEQ_LEN, SHARDS, ROWS = 15, 6, 40  # 240 samples: 7 global batches of 32 per epoch
GLOBAL_BATCH = 32
STEPS = 10  # crosses an epoch boundary


def _shards(changed: tuple[int, int, int] | None = None) -> list[np.ndarray]:
    shards = [synthetic_rows(ROWS, SEQ_LEN + 1, 500, seed=k) for k in range(SHARDS)]
    if changed is not None:
        shard, row, col = changed
        shards[shard][row, col] = (shards[shard][row, col] + 1) % 500
    return shards


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A dataset, and a copy with one token changed (shard 3, row 7, column 5)."""
    root = tmp_path_factory.mktemp("flow")
    storage = local_storage(root)
    val = [synthetic_rows(GLOBAL_BATCH, SEQ_LEN + 1, 500, seed=99)]
    same = commit_token_dataset(
        str(root / "cold" / "a"), {"train": _shards(), "val": val}, SEQ_LEN, 500, storage
    )
    changed = commit_token_dataset(
        str(root / "cold" / "b"), {"train": _shards((3, 7, 5)), "val": val}, SEQ_LEN, 500, storage
    )
    return same, changed, storage


def train_segment(
    manifest,
    storage,
    world_size: int,
    batch_size: int,
    steps: range,
    accum: int = 1,
    state: dict | None = None,
    seed: int = 3,
) -> tuple[list[dict], dict]:
    """What the training loop does with its readers, one reader per rank in this process:
    ``accum`` micro-batches per step, ``mark_step`` after each.  Returns (report, rank 0's
    state)."""
    readers = [
        TieredReader(
            manifest.uri,
            "train",
            storage,
            rank=r,
            world_size=world_size,
            seed=seed,
            batch_size=batch_size,
            prefetch_batches=2,
        )
        for r in range(world_size)
    ]
    streams = []
    for reader in readers:
        if state is not None:
            reader.load_state_dict(state)
        streams.append(reader.iter_steps())
    for step in steps:
        for reader, stream in zip(readers, streams):
            for _ in range(accum):
                next(stream)
            reader.mark_step(step)
    for stream in streams:
        stream.close()
    report = [e for reader in readers for e in reader.flow_report()]
    final_state = readers[0].state_dict()
    for reader in readers:
        reader.close()
    return report, final_state


def test_same_seed_and_data_give_the_same_fingerprints(datasets):
    same, _, storage = datasets
    a, _ = train_segment(same, storage, 2, 16, range(1, STEPS + 1))
    b, _ = train_segment(same, storage, 2, 16, range(1, STEPS + 1))
    assert len(batch_entries(a)) == 2 * STEPS
    assert [e["fingerprint"] for e in batch_entries(a)] == [
        e["fingerprint"] for e in batch_entries(b)
    ]
    assert first_difference(a, b) is None
    fingerprints = [s.fingerprint for s in global_steps(a).values()]
    assert len(set(fingerprints)) == STEPS  # every step's batch is its own
    # another seed is another order
    other, _ = train_segment(same, storage, 2, 16, range(1, STEPS + 1), seed=4)
    assert first_difference(a, other).step == 1


def _step_of(manifest, seed: int, shard_name: str, row: int, global_batch: int) -> int:
    """The training step (from 1) whose global batch holds ``row`` of ``shard_name`` in epoch 0."""
    from components.config.schema import DataConfig
    from components.data.sampler import GlobalOrder

    shards = manifest.shards("train")
    # the readers above shuffle in the default blocks
    order = GlobalOrder(
        [s.rows for s in shards], seed, block_shards=DataConfig.shuffle_block_shards
    )
    positions = np.arange(order.epoch_size)
    _, shard_idx, rows = order.locate(positions)
    index = [s.name for s in shards].index(shard_name)
    position = int(positions[(shard_idx == index) & (rows == row)][0])
    return position // global_batch + 1


def test_one_changed_token_changes_exactly_its_steps(datasets):
    same, changed, storage = datasets
    a, _ = train_segment(same, storage, 2, 16, range(1, STEPS + 1))
    b, _ = train_segment(changed, storage, 2, 16, range(1, STEPS + 1))
    expected = _step_of(same, 3, same.shards("train")[3].name, 7, GLOBAL_BATCH)
    diff = first_difference(a, b)
    assert diff is not None and diff.step == expected
    ga, gb = global_steps(a), global_steps(b)
    differing = [s for s in ga if ga[s].fingerprint != gb[s].fingerprint]
    # the changed sample is in one step of epoch 0, and (STEPS spans past 7 steps) maybe once in
    # epoch 1
    assert differing[0] == expected and len(differing) <= 2
    # exactly one rank's batch differs in that step
    assert (
        sum(
            ga[expected].ranks[r]["fingerprint"] != gb[expected].ranks[r]["fingerprint"]
            for r in (0, 1)
        )
        == 1
    )


@pytest.mark.parametrize("first_world,second_world", [(2, 2), (2, 1), (1, 4)])
def test_stopped_and_resumed_run_sees_the_batches_of_an_uninterrupted_one(
    datasets, first_world, second_world
):
    same, _, storage = datasets
    # the same global batch (world size x micro-batch x accumulation) before and after the stop
    straight, _ = train_segment(same, storage, 2, 8, range(1, STEPS + 1), accum=2)
    first, state = train_segment(
        same, storage, first_world, GLOBAL_BATCH // (2 * first_world), range(1, 4), accum=2
    )
    assert state["position"] == 3 * GLOBAL_BATCH
    second, _ = train_segment(
        same,
        storage,
        second_world,
        GLOBAL_BATCH // (2 * second_world),
        range(4, STEPS + 1),
        accum=2,
        state=state,
    )
    resumed = merge_reports(first, second, upto_step=3)
    assert sorted(global_steps(resumed)) == list(range(1, STEPS + 1))
    assert first_difference(straight, resumed) is None
    if (
        first_world == second_world == 2
    ):  # same world size: every rank's own fingerprint matches too
        key = lambda e: (e["step"], e["rank"])  # noqa: E731
        assert sorted((key(e), e["fingerprint"]) for e in batch_entries(straight)) == sorted(
            (key(e), e["fingerprint"]) for e in batch_entries(resumed)
        )
    # resuming one batch too late is caught at the first step after the stop
    late_state = {**state, "position": state["position"] + 1}
    late, _ = train_segment(
        same,
        storage,
        second_world,
        GLOBAL_BATCH // (2 * second_world),
        range(4, STEPS + 1),
        accum=2,
        state=late_state,
    )
    assert first_difference(straight, merge_reports(first, late, upto_step=3)).step == 4


def test_flow_diff_command_names_the_first_differing_step(datasets, tmp_path):
    same, changed, storage = datasets
    a, _ = train_segment(same, storage, 2, 16, range(1, STEPS + 1))
    b, _ = train_segment(changed, storage, 2, 16, range(1, STEPS + 1))
    expected = _step_of(same, 3, same.shards("train")[3].name, 7, GLOBAL_BATCH)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "flow_report.json").write_text(json.dumps(a))
    # in process: same reports (a file and a directory holding one) -> 0; changed token -> 1
    assert flow_diff([str(tmp_path / "a.json"), str(tmp_path / "run")]) == 0
    assert flow_diff([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert flow_diff([str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2
    # the command line, as a user runs it
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.flow_diff",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"first differing step: {expected} " in proc.stdout
    assert same.shards("train")[3].name in proc.stdout and "(differs)" in proc.stdout


def test_flow_diff_reads_a_train_runs_report_from_mlflow(datasets, tmp_path, new_mlflow_store):
    """A run id: the report the train stage logs as ``data_flow/flow_report.json``."""
    from mlflow import MlflowClient

    same, _, storage = datasets
    a, _ = train_segment(same, storage, 2, 16, range(1, 4))
    report = tmp_path / "flow_report.json"
    report.write_text(json.dumps(a))
    uri = new_mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    experiment = client.create_experiment(
        "flow", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(report), "data_flow")
    assert flow_diff([run_id, str(report), "--tracking-uri", uri]) == 0
    shorter, _ = train_segment(same, storage, 2, 16, range(1, 3))
    (tmp_path / "shorter.json").write_text(json.dumps(shorter))
    assert (
        flow_diff([run_id, str(tmp_path / "shorter.json"), "--tracking-uri", uri]) == 1
    )  # step 3 only in A
    assert flow_diff(["0" * 32, str(report), "--tracking-uri", uri]) == 2
