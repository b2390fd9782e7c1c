"""The per-worker training loop: one process per rank, gloo on CPU or NCCL on GPU.

:func:`train` is what every Ray Train worker runs (``components.training.ray_runner`` wraps it);
it reaches its runner only through a small :class:`Session`, so it also runs in one plain process
(unit tests, debugging) with :class:`LocalSession`. The worker receives the typed
:class:`~components.config.schema.Config` and a :class:`RunInfo` (what the run is about beyond the
config) as they are: dataclasses pickle.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from components.config.schema import Config, StorageConfig
from components.data.flow import merge_reports
from components.training import checkpoint as ckpt
from components.training.metrics import (
    NAN,
    IntervalMetrics,
    StepTimer,
    a2a_seconds,
    expert_fractions,
    exposed_fraction,
    tokens_per_second,
)
from components.training.optim import build_optimizer, build_scheduler
from components.training.parallel import (
    ExpertGradReducer,
    ParallelGroups,
    all_reduce_sum,
    build_groups,
    reshard,
    wrap_ddp,
    wrap_fsdp,
)
from components.training.precision import autocast_dtype, autocast_for, grad_scaler_for
from components.training.step import StepParts, build_balancer, train_step


@dataclass
class RunInfo:
    """Per-run inputs that are not configuration."""

    manifest_uri: str
    vocab_size: int
    seq_len: int
    tracking_uri: str = ""
    mlflow_run_id: str | None = None
    # checkpoint dir or URI to start from when Ray Train has none of its own (first attempt)
    resume_from: str | None = None


# ----------------------------------------------------------------------------- session


class Session(Protocol):
    """What the loop needs from its runner (Ray Train or a plain process)."""

    def device(self, use_gpu: bool) -> torch.device: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Record ``metrics``; ``checkpoint_dir`` (this rank's files) now belongs to the session,
        which deletes it once stored (possibly after returning: asynchronous upload)."""
        ...

    def log(self, message: str) -> None: ...


@dataclass
class LocalSession:
    """Single process: checkpoints are copied under ``root``; reports are kept in memory."""

    root: Path
    resume_dir: str | None = None
    reports: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    def device(self, use_gpu: bool) -> torch.device:
        if not use_gpu:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but this process sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))

    def latest_checkpoint(self):
        return contextlib.nullcontext(self.resume_dir)

    def log(self, message: str) -> None:
        print(message, flush=True)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dest = Path(self.root) / f"step_{int(metrics['step']):07d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            self.checkpoints.append(str(dest))


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_reader(
    config: Config,
    run: RunInfo,
    split: str,
    groups: ParallelGroups,
    device: torch.device,
    prefetch: int,
):
    from components.data.reader import TieredReader

    return TieredReader(
        run.manifest_uri,
        split,
        storage=config.storage,
        cache_dir=config.storage.warm_dir,
        rank=groups.rank,
        world_size=groups.world_size,
        seed=config.data.seed,
        batch_size=config.train.batch_size,
        prefetch_batches=prefetch,
        device=device,
        shuffle_block_shards=config.data.shuffle_block_shards,
    )


def build_model(
    config: Config, vocab_size: int, groups: ParallelGroups, device: torch.device
) -> torch.nn.Module:
    from components.model.transformer import Transformer

    # The model draws all experts' weights and keeps its shard, so the same seed on every rank
    # gives one consistent global model at any expert-parallel size.
    torch.manual_seed(config.train.seed)
    model = Transformer(
        config.model, vocab_size, ep_group=groups.ep_group, overlap=config.train.overlap
    )
    return model.to(device)


def last_logged_step(client, run_id: str, key: str = "loss") -> int:
    """Highest step already logged under ``key``: a restarted attempt must not log it twice."""
    try:
        history = client.get_metric_history(run_id, key)
    except Exception:
        return -1
    return max((m.step for m in history), default=-1)


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(
    model, val_reader, batches: int, config: Config, device, groups: ParallelGroups
) -> float:
    """Validation cross-entropy per token over ``batches`` global batches of rows spread over
    the whole split (``iter_eval``: every shard, the same rows at every evaluation).

    ``iter_eval`` gives every rank the same number of batches: with expert parallelism each
    forward is a collective, so ranks must not disagree on when to stop.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    try:
        for batch in val_reader.iter_eval(batches):
            batch = batch.to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast_for(config.train.precision, device):
                logits, _ = model(inputs)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += torch.stack(
                [loss.double(), torch.tensor(targets.numel(), dtype=torch.float64, device=device)]
            )
    finally:
        model.train()
        reshard(model)  # FSDP2: no backward follows to reshard the root unit
    total = all_reduce_sum(total, groups)
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------- the loop


def train(config: Config, run: RunInfo, session: Session) -> dict[str, float]:
    """Train until ``train.max_steps`` (or ``train.stop_at_step``); returns the final metrics."""
    t = config.train
    device = session.device(t.use_gpu)
    groups = build_groups(t.expert_parallel_size)
    is_main = groups.rank == 0
    seed_everything(t.seed + groups.rank)

    model = build_model(config, run.vocab_size, groups, device)
    model.configure_training(t.activation_checkpointing, t.compile_backend if t.compile else None)
    fsdp = t.data_parallel == "fsdp" and groups.distributed
    if fsdp:  # before the optimizer: fully_shard turns the parameters into DTensors
        wrap_fsdp(model, groups, device, autocast_dtype(t.precision))
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    scaler = grad_scaler_for(t.precision, device, groups)
    balancer = build_balancer(model, optimizer)
    prefetch = config.storage.hot_prefetch_batches if t.overlap.prefetch else 0
    reader = make_reader(config, run, "train", groups, device, prefetch)

    step = 0
    resumed_meta: dict[str, Any] = {}
    prior_flow: list[dict] | None = None  # the data-flow report of the steps before the checkpoint
    with session.latest_checkpoint() as latest:
        source = latest or run.resume_from
        if source:
            with _local_checkpoint(source, config.storage) as local_dir:
                restored = ckpt.load_checkpoint(
                    local_dir,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    groups=groups,
                )
                if is_main:
                    prior_flow = ckpt.read_flow_report(local_dir)
            step, resumed_meta = restored.step, restored.meta
            if restored.reader_state is not None:
                reader.load_state_dict(restored.reader_state)
            if is_main:
                session.log(
                    f"[train] resumed from {source} at step {step} (read "
                    f"{', '.join(restored.files_read)})"
                )
    start_step = step

    parts = StepParts(
        model=model,
        wrapped=model if fsdp else wrap_ddp(model, groups, device, t.overlap.ddp_bucket_mb),
        optimizer=optimizer,
        scheduler=scheduler,
        groups=groups,
        grad_clip=t.grad_clip,
        # FSDP2 casts parameters (and so activations) to bf16 itself: no autocast on top
        autocast=(lambda: contextlib.nullcontext())
        if fsdp
        else (lambda: autocast_for(t.precision, device)),
        scaler=scaler,
        balancer=balancer,
    )
    if not fsdp and groups.edp_group is not None:
        parts.expert_reducer = ExpertGradReducer(
            parts.expert_params, groups, t.overlap.ddp_bucket_mb
        )
    val_reader = make_reader(config, run, "val", groups, device, 0)
    # endless across epochs; the reader's position counts only batches handed out here, so
    # its state_dict() is exact even with batches prefetched ahead
    batches = reader.iter_steps()
    stream = (batch.to(device, non_blocking=True) for batch in batches)

    client = None
    skip_until = -1
    if is_main and run.mlflow_run_id and run.tracking_uri:
        from mlflow import MlflowClient

        client = MlflowClient(run.tracking_uri)
        skip_until = last_logged_step(client, run.mlflow_run_id)

    stop_at = t.stop_at_step or t.max_steps
    tokens_per_step = t.batch_size * run.seq_len * t.grad_accum_steps * groups.world_size
    timer = StepTimer(device)
    interval = IntervalMetrics(device)
    a2a_seconds(model)  # start the all-to-all clocks from zero
    interval_steps, interval_start = 0, time.perf_counter()
    last: dict[str, float] = {"step": float(step), "start_step": float(start_step)}
    layer_counts: list[list[float]] = []
    if step >= stop_at:
        # resumed from a finished run: nothing to train, but report what the model is worth
        last["train_loss"] = last["loss"] = float(resumed_meta.get("train_loss") or math.nan)
        last.update(
            {
                "moe/dropped_fraction": NAN,
                "moe/load_max_over_mean": NAN,
                "comm/exposed_fraction": NAN,
            }
        )
        last["val_loss"] = evaluate(
            parts.wrapped, val_reader, t.eval_batches, config, device, groups
        )
        session.report(last, None)
        if is_main:
            session.log(
                f"[train] checkpoint is already at step {step} >= {stop_at}: nothing to train"
            )

    while step < stop_at:
        lr = optimizer.param_groups[0][
            "lr"
        ]  # the rate this step uses (the scheduler moves it after)
        train_step(parts, stream, t.grad_accum_steps, interval, timer)
        step += 1
        reader.mark_step(
            step
        )  # this step's micro-batches -> its fingerprint in the data-flow report
        interval_steps += 1

        log_now = step % t.log_every == 0 or step == stop_at
        checkpoint_now = step % t.checkpoint_every == 0 or step == stop_at
        # every report carries val_loss (Tune schedulers need their metric in each result)
        eval_now = step % t.eval_every == 0 or checkpoint_now
        if log_now or eval_now:
            # the only reads of training metrics, once per interval (IntervalMetrics.read)
            values, layer_counts = interval.read(groups)
            now = time.perf_counter()
            last = {
                "step": float(step),
                "start_step": float(start_step),
                "lr": lr,
                **values,
                **_interval_times(timer, model, interval_steps, now - interval_start),
                "tokens_per_s": tokens_per_second(
                    tokens_per_step * interval_steps, now - interval_start
                ),
                **_reader_stats(reader),
            }
            interval_steps, interval_start = 0, now
            if not math.isfinite(last["loss"]) and t.precision != "fp16":
                raise FloatingPointError(
                    f"training loss is {last['loss']} at step {step}: lower train.lr or check the "
                    "data"
                )
            if is_main and log_now:
                session.log(
                    f"[train] step {step}/{t.max_steps} loss {last['loss']:.4f} aux "
                    f"{last['aux_loss']:.4f} "
                    f"lr {lr:.2e} tok/s {last['tokens_per_s']:.0f} "
                    f"load {last['moe/load_max_over_mean']:.2f} dropped "
                    f"{last['moe/dropped_fraction']:.3f} "
                    f"data {last['data_wait_s'] * 1e3:.1f}ms comm {last['comm_s'] * 1e3:.1f}ms "
                    f"exposed a2a {last['comm/exposed_fraction']:.2f}"
                    + (f" skipped {int(last['skipped_steps'])}" if last["skipped_steps"] else "")
                )

        side_start = time.perf_counter()
        if eval_now:
            last["val_loss"] = evaluate(
                parts.wrapped, val_reader, t.eval_batches, config, device, groups
            )
            if is_main:
                session.log(f"[train] step {step} val_loss {last['val_loss']:.4f}")

        if client is not None and step > skip_until and (log_now or eval_now):
            extra = expert_fractions(layer_counts) if eval_now else {}
            _log_to_mlflow(client, run.mlflow_run_id, {**last, **extra}, step)

        if eval_now:
            # every checkpoint carries the report of all steps so far (a resumed run continues it)
            flow = _gather_flow_reports(reader, groups) if checkpoint_now else None
            if flow is not None and is_main:
                flow = merge_reports(prior_flow, flow, upto_step=start_step)
            ckpt_dir = None
            if checkpoint_now:
                # handed to the session, which removes it once stored (see Session.report)
                ckpt_dir = tempfile.mkdtemp(prefix=f"moeops-ckpt-r{groups.rank}-")
                ckpt.save_checkpoint(
                    ckpt_dir,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    groups=groups,
                    step=step,
                    reader_state=reader.state_dict(),
                    meta={
                        "max_steps": t.max_steps,
                        "vocab_size": run.vocab_size,
                        "model": asdict(config.model),
                        "val_loss": last.get("val_loss"),
                        "train_loss": last.get("train_loss"),
                    },
                    flow_report=flow if is_main else None,
                )
            session.report({k: float(v) for k, v in last.items() if v is not None}, ckpt_dir)
            # evaluation and checkpointing are not training throughput, nor training communication
            interval_start += time.perf_counter() - side_start
            a2a_seconds(model)

    stream.close()
    batches.close()
    reader.close()
    val_reader.close()
    return last


def _interval_times(
    timer: StepTimer, model: torch.nn.Module, steps: int, wall_s: float
) -> dict[str, float]:
    """Per-step averages over the interval: data wait, compute, exposed communication, step time;
    and the all-to-all's exposed / total time (``comm/exposed_fraction``)."""
    phases = timer.read()
    a2a_exposed, a2a_total = a2a_seconds(model)
    steps = max(steps, 1)
    return {
        "data_wait_s": phases["data_wait_s"] / steps,
        # all-to-all waits happen inside the forward/backward (the compute phase)
        "compute_s": max(phases["compute_s"] - a2a_exposed, 0.0) / steps,
        "comm_s": (phases["comm_s"] + a2a_exposed) / steps,
        "step_time_s": wall_s / steps,
        "comm/a2a_exposed_s": a2a_exposed / steps,
        "comm/a2a_total_s": a2a_total / steps,
        "comm/exposed_fraction": exposed_fraction(a2a_exposed, a2a_total),
    }


def _reader_stats(reader) -> dict[str, float]:
    """The reader's tier statistics: warm hit rate, bytes from cold / warm / hot, data wait."""
    return {f"data/{k}": float(v) for k, v in reader.stats().items()}


def _gather_flow_reports(reader, groups: ParallelGroups) -> list[dict]:
    """Every rank's flow report entries (each names its rank); a collective: all ranks call it."""
    mine = reader.flow_report()
    if not groups.distributed:
        return mine
    everyone: list[Any] = [None] * groups.world_size
    dist.all_gather_object(everyone, mine)
    return [entry for part in everyone for entry in part]


def _log_to_mlflow(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from components.tracking.mlflow_utils import log_metrics

    keep = {
        k: v
        for k, v in metrics.items()
        if k not in ("step", "start_step") and v is not None and math.isfinite(v)
    }
    try:
        log_metrics(client, run_id, keep, step)
    except Exception as err:  # tracking hiccups must not kill a long run
        print(f"[train] MLflow logging failed at step {step}: {err}", flush=True)


@contextlib.contextmanager
def _local_checkpoint(source: str, storage: StorageConfig) -> Iterator[str]:
    """A local directory for a checkpoint given as a path or a URI (downloaded to a temp dir
    with the cold tier's filesystem settings: endpoint, region, credential variables)."""
    if "://" not in source or source.startswith("file://"):
        path = source[len("file://") :] if source.startswith("file://") else source
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"train.resume / resume_from={source!r}: no such checkpoint directory"
            )
        yield path
        return
    from components.data.cold import filesystem_for

    fs, remote = filesystem_for(source, storage)
    if not fs.exists(remote):
        raise FileNotFoundError(f"train.resume / resume_from={source!r}: no such checkpoint")
    with tempfile.TemporaryDirectory(prefix="moeops-resume-") as local:
        fs.get(remote.rstrip("/") + "/", local + "/", recursive=True)
        yield local
