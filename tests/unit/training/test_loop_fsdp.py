"""The whole training loop with ``train.data_parallel=fsdp`` at world 2 / EP 2 (two gloo
processes, each running ``components.training.loop.train`` with a LocalSession, no Ray): the loss
curve equals the DDP loop's; FSDP2 with selective activation checkpointing stopped at step 2
and resumed from its checkpoint replays the uninterrupted FSDP2 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from components.config import load_config
from fixtures.tiny import SMALL_DATA

TINY = [
    *SMALL_DATA,  # the session's small_dataset is prepared with these
    "model.dim=32",
    "model.ffn_dim=64",
    "train.num_workers=2",
    "train.expert_parallel_size=2",
    "tune.trial_num_workers=2",
    "train.batch_size=2",
    "train.eval_every=1",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.max_steps=4",
    "storage.hot_prefetch_batches=0",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, small_dataset):
    """The session's prepared SMALL_DATA set, not one more tokenizer training and encoding."""
    return tmp_path_factory.mktemp("loop-fsdp"), small_dataset.manifest


def _rank(rank, world, init, root, manifest: dict, overrides: list, tag: str, resume) -> None:
    import torch
    import torch.distributed as dist

    from components.training.loop import LocalSession, RunInfo, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        cfg = load_config(
            [*TINY, f"paths.root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *overrides]
        )
        session = LocalSession(Path(root) / tag, resume_dir=resume)
        train(cfg, RunInfo(manifest["uri"], manifest["vocab"], manifest["seq"]), session)
        Path(root, f"{tag}-rank{rank}.json").write_text(
            json.dumps({"reports": session.reports, "checkpoints": session.checkpoints})
        )
    finally:
        dist.destroy_process_group()


def _run(root: Path, manifest, tag: str, overrides: list[str], resume: str | None = None) -> dict:
    info = {"uri": manifest.uri, "vocab": manifest.vocab_size, "seq": manifest.seq_len}
    mp.spawn(
        _rank,
        args=(2, str(root / f"{tag}.init"), str(root), info, overrides, tag, resume),
        nprocs=2,
        join=True,
    )
    return json.loads((root / f"{tag}-rank0.json").read_text())


def _losses(run: dict) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in run["reports"] if "loss" in r}


# two 2-process training loops and a resume: ~30 s (make test-all; test_fsdp.py checks FSDP2
# against DDP step by step in make test)
@pytest.mark.slow
def test_fsdp_loop_follows_ddp_and_resumes(dataset):
    root, manifest = dataset
    ddp = _losses(_run(root, manifest, "ddp", []))
    fsdp_run = _run(
        root,
        manifest,
        "fsdp",
        ["train.data_parallel=fsdp", "train.activation_checkpointing=selective"],
    )
    fsdp = _losses(fsdp_run)
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-4), step
    first = _run(
        root,
        manifest,
        "first",
        [
            "train.data_parallel=fsdp",
            "train.activation_checkpointing=selective",
            "train.stop_at_step=2",
        ],
    )
    assert first["checkpoints"][-1].endswith("step_0000002")
    ckpt = Path(first["checkpoints"][-1])
    # both ranks' files in one directory, the shared state and both expert shards
    assert {"meta.json", "shared.pt", "experts-000-of-002.pt", "experts-001-of-002.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    second = _run(
        root,
        manifest,
        "second",
        ["train.data_parallel=fsdp", "train.activation_checkpointing=selective"],
        resume=str(ckpt),
    )
    resumed = _losses(second)
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(fsdp[step], rel=1e-5), step
