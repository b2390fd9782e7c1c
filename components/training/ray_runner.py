"""Ray Train's TorchTrainer over :mod:`components.training.loop`, then the export.

:func:`run_training` is what the ``train`` stage, Tune trials (``pipelines.tune``) and the dense
baseline (``pipelines.evaluate``) call; the caller starts or joins Ray first
(``pipelines.runtime.ensure_ray``). The typed :class:`~components.config.schema.Config` and
:class:`~components.training.loop.RunInfo` cross into the workers as they are (dataclasses pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import Config

# config keys that change the trained weights: a run with the same ones (and the same dataset)
# continues the same checkpoints when train.resume=auto
_CURVE_KEYS = (
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "router_lr_scale",
    "expert_lr_scale",
    "beta1",
    "beta2",
    "grad_clip",
    "batch_size",
    "grad_accum_steps",
    "max_steps",
    "seed",
    "precision",
)


@dataclass
class TrainResult:
    # at least val_loss, train_loss, tokens_per_s, steps, and over the last logging interval
    # moe/dropped_fraction, moe/load_max_over_mean, comm/exposed_fraction (NaN: not measured)
    metrics: dict[str, float]
    checkpoint_path: str  # latest Ray Train checkpoint dir (local path or URI)
    export_dir: str  # local dir holding save_export(...) output (EP-size independent)
    flow_report_path: str = ""  # JSON list of every rank's data-flow report entries


def training_name(config: Config, manifest_uri: str, code: str, prefix: str = "train") -> str:
    """A Ray Train run name that is the same for the same model, data, optimisation settings and
    code (``code``: the stage's code digest), so re-running after a crash or a stop continues from
    the run's latest checkpoint, while a code change trains new weights instead of resuming the
    old code's final checkpoint."""
    if not code:
        raise ValueError("training_name: empty code digest (the stage's cache key names its code)")
    key = {
        "code": code,
        "manifest": manifest_uri,
        "model": dataclasses.asdict(config.model),
        "train": {k: getattr(config.train, k) for k in _CURVE_KEYS},
        "data_order": [config.data.seed, config.data.shuffle_block_shards],
    }
    return f"{prefix}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def _storage(config: Config) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig from ``train.checkpoint_uri``.

    Object stores reuse the cold tier's settings (endpoint, region, credential variables)."""
    uri = config.train.checkpoint_uri
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from components.data.cold import filesystem_for

    fs, path = filesystem_for(uri, config.storage)
    return path, PyFileSystem(FSSpecHandler(fs))


def _checkpoint_uri(config: Config, checkpoint) -> str:
    """The checkpoint's location with its scheme (Ray reports object-store paths without it)."""
    uri = config.train.checkpoint_uri
    if "://" in uri and not uri.startswith("file://"):
        return f"{uri.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def _progress_callback(total: int):
    """A Ray Train callback printing `[train] N/M steps ... loss=` lines (runs in the controller,
    whose output reaches the driver's log)."""
    from ray.train import UserCallback

    class TrainProgress(UserCallback):
        def __init__(self):
            self.progress = None
            # wall clock, not monotonic: the controller may run on another machine than the driver
            self.created = time.time()

        def after_report(self, run_context, metrics, checkpoint):
            from components.tracking.progress import Progress

            if not metrics:
                return
            main = metrics[0]
            if self.progress is None:
                self.progress = Progress("train", total, min_interval_s=0.0)
                self.progress.started -= max(time.time() - self.created, 0.0)
            shown = {k: round(main[k], 4) for k in ("loss", "val_loss") if k in main}
            self.progress.set(int(main.get("step", 0)), **shown)

    return TrainProgress()


def _callbacks(total_steps: int, report_to_tune: bool) -> list:
    callbacks = [_progress_callback(total_steps)]
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return callbacks


class RayTrainSession:
    """The training loop's view of Ray Train (``components.training.loop.Session``).

    ``async_upload`` (``train.async_checkpoint``): a reported checkpoint is uploaded to
    ``train.checkpoint_uri`` in the background (Ray Train's ``CheckpointUploadMode.ASYNC``) while
    training continues, and its local copy deleted afterwards. Ray Train registers a checkpoint
    only once every rank's upload has finished, so a worker killed mid-upload leaves the previous
    checkpoint as the latest: the restarted group resumes from it.
    """

    def __init__(self, async_upload: bool = False):
        self.async_upload = async_upload

    def device(self, use_gpu: bool):
        import ray.train.torch
        import torch

        if not use_gpu:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but this Ray Train worker sees no CUDA device")
        return ray.train.torch.get_device()

    def latest_checkpoint(self):
        import contextlib

        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return contextlib.nullcontext(None)
        return checkpoint.as_directory()

    def log(self, message: str) -> None:
        # Ray Train tees a worker's print() to its logger as well, so a print would reach the
        # driver twice; the root logger's console handler reaches it once.
        logging.getLogger("moeops.train").info(message)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        step = int(metrics["step"])
        mode = ray.train.CheckpointUploadMode
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            # one name per step: every rank's files land in the same directory
            checkpoint_dir_name=f"step_{step:07d}" if checkpoint else None,
            checkpoint_upload_mode=mode.ASYNC if self.async_upload else mode.SYNC,
            # the loop hands the directory over: Ray removes it once uploaded
            delete_local_checkpoint_after_upload=True if checkpoint else None,
        )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What Ray Train's TorchTrainer runs on every worker (``train_loop_config`` must be a dict:
    ``{"config": Config, "run": RunInfo}``, both pickled as they are)."""
    from components.training.loop import train

    config = loop_config["config"]
    train(config, loop_config["run"], RayTrainSession(config.train.async_checkpoint))


def _local_tokenizer(uri: str, storage, dest: Path) -> Path:
    """The tokenizer as a local file (it may live in an object store with its own endpoint)."""
    from components.data.cold import read_bytes

    dest.write_bytes(read_bytes(uri, storage, what="tokenizer"))
    return dest


def run_training(
    config: Config,
    manifest_uri: str,
    *,
    mlflow_run_id: str | None,
    name: str,
    report_to_tune: bool = False,
    resume_from: str | None = None,
) -> TrainResult:
    """Train on Ray Train and export the final model (all experts gathered).

    ``report_to_tune``: inside a Tune trial, pass every report on to Tune (ASHA reads
    ``val_loss``), which Train V2 does only through Ray's ``TuneReportCallback``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.data.manifest import load_manifest
    from components.model.export import save_export
    from components.training.checkpoint import FLOW_REPORT_FILE, load_full_model_state
    from components.training.loop import RunInfo

    t = config.train
    manifest = load_manifest(manifest_uri, config.storage)
    if manifest.seq_len > config.model.max_seq_len:
        raise ValueError(
            f"dataset {manifest_uri} has seq_len={manifest.seq_len} but "
            f"model.max_seq_len={config.model.max_seq_len}: "
            "raise model.max_seq_len or prepare the data with a smaller data.seq_len"
        )
    if t.resume not in ("auto", "never") and not resume_from:
        resume_from = t.resume
    if t.resume == "never" or config.force:
        # A fresh run directory (Ray Train restores only from one of the same name):
        # force=true means "recompute", not "pick up the finished checkpoint".
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunInfo(
        manifest_uri=manifest_uri,
        vocab_size=manifest.vocab_size,
        seq_len=manifest.seq_len,
        tracking_uri=config.tracking.uri,
        mlflow_run_id=mlflow_run_id,
        resume_from=resume_from,
    )
    storage_path, storage_fs = _storage(config)
    # Ray Train reads this from the environment of the process that creates its controller (and
    # passes it on); it has no constructor argument for it
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.worker_start_timeout_s)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    backend = t.backend if t.backend != "auto" else ("nccl" if t.use_gpu else "gloo")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "run": run},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=_callbacks(t.stop_at_step or t.max_steps, report_to_tune),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")

    out_root = Path(config.paths.root) / "exports" / name
    export_dir = out_root / "export"
    if export_dir.exists():
        shutil.rmtree(export_dir)
    flow_report_path = out_root / FLOW_REPORT_FILE
    with result.checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory() as tmp:
        state = load_full_model_state(ckpt_dir)
        tokenizer = _local_tokenizer(
            manifest.tokenizer_uri, config.storage, Path(tmp) / "tokenizer.json"
        )
        save_export(state, config.model, manifest.vocab_size, tokenizer, export_dir)
        if (Path(ckpt_dir) / FLOW_REPORT_FILE).exists():
            shutil.copyfile(Path(ckpt_dir) / FLOW_REPORT_FILE, flow_report_path)

    metrics = {
        k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
    }
    metrics["steps"] = metrics.get("step", 0.0)
    for key in ("moe/dropped_fraction", "moe/load_max_over_mean", "comm/exposed_fraction"):
        metrics.setdefault(key, float("nan"))
    return TrainResult(
        metrics=metrics,
        checkpoint_path=_checkpoint_uri(config, result.checkpoint),
        export_dir=str(export_dir),
        flow_report_path=str(flow_report_path) if flow_report_path.exists() else "",
    )
