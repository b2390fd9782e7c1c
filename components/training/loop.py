"""The per-worker training loop Ray Train runs: one process per rank, gloo on CPU or NCCL on GPU.

``train_loop_per_worker(config_dict)`` is the only entry point Ray Train calls. The dict is
``components.config.to_container(config)`` plus one extra key, :data:`RUN_INFO_KEY`, holding
:class:`RunInfo` (what the run is about beyond the config: dataset, MLflow run, resume source).

The loop itself (:func:`train`) talks to Ray Train only through a small :class:`Session`, so it
also runs in one plain process (unit tests, debugging) with :class:`LocalSession`.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from components.config import config_from_dict
from components.config.schema import Config, StorageConfig
from components.training import checkpoint as ckpt
from components.training.metrics import StepTimer, expert_fractions, expert_load_metrics, tokens_per_second
from components.training.optim import build_optimizer, build_scheduler
from components.training.parallel import (
    ParallelGroups,
    all_reduce_sum,
    build_groups,
    clip_grad_norm,
    split_params,
    sync_expert_grads,
    wrap_ddp,
)

RUN_INFO_KEY = "_moeops_run"


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
    # chaos testing: "<step>:<rank>:<marker file>" kills that rank once, right after that step
    fault: str = ""


def pack_config(config_dict: dict[str, Any], run: RunInfo) -> dict[str, Any]:
    return {**config_dict, RUN_INFO_KEY: asdict(run)}


def unpack_config(config_dict: dict[str, Any]) -> tuple[Config, RunInfo]:
    data = dict(config_dict)
    run = data.pop(RUN_INFO_KEY, None)
    if run is None:
        raise KeyError(f"train_loop_per_worker: config dict has no {RUN_INFO_KEY!r} (build it with pack_config)")
    return config_from_dict(data), RunInfo(**run)


# ----------------------------------------------------------------------------- session

class Session(Protocol):
    """What the loop needs from its runner (Ray Train or a plain process)."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def wait_for_checkpoints(self) -> None: ...


class RayTrainSession:
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return contextlib.nullcontext(None)
        return checkpoint.as_directory()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        step = int(metrics["step"])
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            # one name per step: every rank's files land in the same directory
            checkpoint_dir_name=f"step_{step:07d}" if checkpoint else None,
        )

    def wait_for_checkpoints(self) -> None:
        """Block until the controller has registered every reported checkpoint.

        Ray Train's controller collects reports when it polls the workers (every couple of
        seconds); a worker that dies before that poll takes its last report with it.
        """
        import ray.train
        from ray.train.v2.api.report_config import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED, timeout_s=120)


@dataclass
class LocalSession:
    """Single process: checkpoints are copied under ``root``; reports are kept in memory."""

    root: Path
    resume_dir: str | None = None
    reports: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    def latest_checkpoint(self):
        return contextlib.nullcontext(self.resume_dir)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dest = Path(self.root) / f"step_{int(metrics['step']):07d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            self.checkpoints.append(str(dest))

    def wait_for_checkpoints(self) -> None:
        pass


# ----------------------------------------------------------------------------- helpers

def select_device(config: Config) -> torch.device:
    if not config.train.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu=true but this worker sees no CUDA device")
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def autocast_for(config: Config, device: torch.device):
    """bf16/fp16 autocast on GPU; fp32 (no autocast) on CPU."""
    precision = config.train.precision
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_inject_fault(spec: str, step: int, rank: int, session: Session) -> None:
    """Kill this process (no cleanup, like a lost node) once: the marker file records that it happened.

    It dies only after Ray Train has registered the checkpoints reported so far, so the test
    of resuming does not depend on the controller's polling schedule.
    """
    if not spec:
        return
    fault_step, fault_rank, marker = spec.split(":", 2)
    if step == int(fault_step) and rank == int(fault_rank) and not os.path.exists(marker):
        session.wait_for_checkpoints()
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"killed rank {rank} after step {step}\n")
        print(f"[train] fault injection: killing rank {rank} after step {step}", flush=True)
        os._exit(1)


def make_reader(config: Config, run: RunInfo, split: str, groups: ParallelGroups, device: torch.device, prefetch: int):
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
    )


def build_model(config: Config, vocab_size: int, groups: ParallelGroups, device: torch.device) -> torch.nn.Module:
    from components.model.transformer import Transformer

    # The model draws all experts' weights and keeps its shard, so the same seed on every rank
    # gives one consistent global model at any expert-parallel size.
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model, vocab_size, ep_group=groups.ep_group, overlap=config.train.overlap)
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
def evaluate(model, val_reader, batches: int, config: Config, device, groups: ParallelGroups) -> float:
    """Validation cross-entropy per token over the split's first ``batches`` global batches.

    ``iter_eval`` gives every rank the same number of batches: with expert parallelism each
    forward is a collective, so ranks must not disagree on when to stop.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    try:
        for batch in val_reader.iter_eval(batches):
            batch = batch.to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast_for(config, device):
                logits, _ = model(inputs)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(targets.numel(), dtype=torch.float64, device=device)])
    finally:
        model.train()
    total = all_reduce_sum(total, groups)
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------- one step

def forward_backward(ddp_model, model, stream, config: Config, device, timer: StepTimer, scaler
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward over ``train.grad_accum_steps`` micro-batches (gradients accumulate).

    Returns per-rank sums over micro-batches of [cross-entropy, aux loss, z loss, dropped
    fraction] and the per-layer expert counts ``[E]`` of this rank's tokens.
    """
    accum = config.train.grad_accum_steps
    sums = torch.zeros(4, dtype=torch.float64)
    expert_counts: list[torch.Tensor] = []
    for micro in range(accum):
        with timer.phase("data_wait"):
            batch = next(stream).to(device, non_blocking=True)  # [B, T + 1]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        # DDP all-reduces only on the last micro-batch; earlier ones just accumulate
        last_micro = micro == accum - 1
        no_sync = ddp_model.no_sync() if (not last_micro and ddp_model is not model) else contextlib.nullcontext()
        with timer.phase("compute"), no_sync:
            with autocast_for(config, device):
                logits, aux = ddp_model(inputs)  # [B, T, V]
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss = (ce + aux["aux_loss"] + aux["z_loss"]) / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        dropped = aux["dropped_fraction"]
        sums += torch.tensor([ce.item(), aux["aux_loss"].item(), aux["z_loss"].item(),
                              float(sum(dropped) / len(dropped)) if dropped else 0.0], dtype=torch.float64)
        counts = [c.detach().float().cpu() for c in aux["expert_counts"]]
        expert_counts = counts if not expert_counts else [a + b for a, b in zip(expert_counts, counts)]
    return sums, expert_counts


def reduce_step_metrics(sums: torch.Tensor, expert_counts: list[torch.Tensor], accum: int, device,
                        groups: ParallelGroups) -> tuple[float, float, float, float, list[torch.Tensor]]:
    """One small all-reduce for everything logged: the losses averaged over micro-batches and
    ranks, and the routing of all ranks' tokens. Returns (ce, aux, z, dropped fraction,
    per-layer counts [E])."""
    counts_flat = torch.cat(expert_counts) if expert_counts else torch.zeros(0)
    # on the training device: NCCL reduces CUDA tensors only
    packed = torch.cat([sums / accum, counts_flat.double()]).to(device)
    reduced = all_reduce_sum(packed, groups).cpu()
    ce, aux, z, dropped = (reduced[:4] / groups.world_size).tolist()
    layer_counts = list(reduced[4:].float().split(expert_counts[0].numel())) if expert_counts else []
    return ce, aux, z, dropped, layer_counts


# ----------------------------------------------------------------------------- the loop

def train(config: Config, run: RunInfo, session: Session) -> dict[str, float]:
    """Train until ``train.max_steps`` (or ``train.stop_at_step``); returns the final metrics."""
    t = config.train
    device = select_device(config)
    groups = build_groups(t.expert_parallel_size)
    is_main = groups.rank == 0
    seed_everything(t.seed + groups.rank)

    model = build_model(config, run.vocab_size, groups, device)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and t.precision == "fp16") else None
    prefetch = config.storage.hot_prefetch_batches if t.overlap.prefetch else 0
    reader = make_reader(config, run, "train", groups, device, prefetch)

    step = 0
    resumed_meta: dict[str, Any] = {}
    with session.latest_checkpoint() as latest:
        source = latest or run.resume_from
        if source:
            with _local_checkpoint(source, config.storage) as local_dir:
                restored = ckpt.load_checkpoint(local_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                                scaler=scaler, groups=groups)
            step, resumed_meta = restored.step, restored.meta
            if restored.reader_state is not None:
                reader.load_state_dict(restored.reader_state)
            if is_main:
                print(f"[train] resumed from {source} at step {step}", flush=True)
    start_step = step

    ddp_model = wrap_ddp(model, groups, device, t.overlap.ddp_bucket_mb)
    dense_params, expert_params = split_params(model)
    val_reader = make_reader(config, run, "val", groups, device, 0)
    # endless across epochs; the reader's position counts only batches handed out here, so
    # its state_dict() is exact even with batches prefetched ahead
    stream = reader.iter_steps()

    client = None
    skip_until = -1
    if is_main and run.mlflow_run_id and run.tracking_uri:
        from mlflow import MlflowClient

        client = MlflowClient(run.tracking_uri)
        skip_until = last_logged_step(client, run.mlflow_run_id)

    stop_at = t.stop_at_step or t.max_steps
    tokens_per_step = t.batch_size * run.seq_len * t.grad_accum_steps * groups.world_size
    timer = StepTimer(device)
    interval_tokens, interval_start = 0, time.perf_counter()
    last: dict[str, float] = {"step": float(step), "start_step": float(start_step)}
    if step >= stop_at:
        # resumed from a finished run: nothing to train, but report what the model is worth
        last["train_loss"] = last["loss"] = float(resumed_meta.get("train_loss") or math.nan)
        last["val_loss"] = evaluate(ddp_model, val_reader, t.eval_batches, config, device, groups)
        session.report(last, None)
        if is_main:
            print(f"[train] checkpoint is already at step {step} >= {stop_at}: nothing to train", flush=True)

    while step < stop_at:
        sums, expert_counts = forward_backward(ddp_model, model, stream, config, device, timer, scaler)
        with timer.phase("comm"):
            sync_expert_grads(expert_params, groups)
        if scaler is not None:
            scaler.unscale_(optimizer)
        with timer.phase("comm"):
            grad_norm = clip_grad_norm(dense_params, expert_params, t.grad_clip, groups)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used (the scheduler moves it next)
        with timer.phase("compute"):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        step += 1

        with timer.phase("comm"):
            ce_mean, aux_mean, z_mean, dropped, layer_counts = reduce_step_metrics(
                sums, expert_counts, t.grad_accum_steps, device, groups)
        times = timer.reset()
        times["comm_s"] += model.comm_wait_seconds(reset=True)
        interval_tokens += tokens_per_step

        last = {
            "step": float(step),
            "start_step": float(start_step),
            "loss": ce_mean,
            "train_loss": ce_mean,
            "aux_loss": aux_mean,
            "z_loss": z_mean,
            "dropped_fraction": dropped,
            "grad_norm": float(grad_norm),
            "lr": lr,
            **times,
            **expert_load_metrics(layer_counts),
        }
        if not math.isfinite(ce_mean):
            raise FloatingPointError(f"training loss is {ce_mean} at step {step}: lower train.lr or check the data")

        log_now = step % t.log_every == 0 or step == stop_at
        if log_now:
            now = time.perf_counter()
            last["tokens_per_s"] = tokens_per_second(interval_tokens, now - interval_start)
            interval_tokens, interval_start = 0, now
            data_stats = _reader_stats(reader)
            last.update(data_stats)
            if is_main:
                print(f"[train] step {step}/{t.max_steps} loss {ce_mean:.4f} aux {aux_mean:.4f} "
                      f"lr {last['lr']:.2e} tok/s {last['tokens_per_s']:.0f} "
                      f"data {times['data_wait_s'] * 1e3:.1f}ms comm {times['comm_s'] * 1e3:.1f}ms", flush=True)

        checkpoint_now = step % t.checkpoint_every == 0 or step == stop_at
        # every report carries val_loss (Tune schedulers need their metric in each result)
        eval_now = step % t.eval_every == 0 or checkpoint_now
        side_start = time.perf_counter()
        if eval_now:
            last["val_loss"] = evaluate(ddp_model, val_reader, t.eval_batches, config, device, groups)
            if is_main:
                print(f"[train] step {step} val_loss {last['val_loss']:.4f}", flush=True)

        if client is not None and step > skip_until and (log_now or eval_now):
            extra = expert_fractions(layer_counts) if eval_now else {}
            _log_to_mlflow(client, run.mlflow_run_id, {**last, **extra}, step)

        if eval_now:
            final = step == stop_at
            flow = _gather_flow_reports(reader, groups) if final else None
            with tempfile.TemporaryDirectory(prefix=f"moeops-ckpt-r{groups.rank}-") as tmp:
                ckpt_dir = None
                if checkpoint_now:
                    ckpt.save_checkpoint(
                        tmp, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        groups=groups, step=step, reader_state=reader.state_dict(),
                        meta={"max_steps": t.max_steps, "vocab_size": run.vocab_size,
                              "model": asdict(config.model), "val_loss": last.get("val_loss"),
                              "train_loss": ce_mean},
                        flow_report=flow if is_main else None,
                    )
                    ckpt_dir = tmp
                session.report({k: float(v) for k, v in last.items() if v is not None}, ckpt_dir)

        if eval_now:
            # evaluation and checkpointing are not training throughput
            timer.reset()
            interval_start += time.perf_counter() - side_start
        maybe_inject_fault(run.fault, step, groups.rank, session)

    stream.close()
    reader.close()
    val_reader.close()
    return last


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

    keep = {k: v for k, v in metrics.items() if k not in ("step", "start_step") and v is not None and math.isfinite(v)}
    try:
        log_metrics(client, run_id, keep, step)
    except Exception as err:  # tracking hiccups must not kill a long run
        print(f"[train] MLflow logging failed at step {step}: {err}", flush=True)


@contextlib.contextmanager
def _local_checkpoint(source: str, storage: StorageConfig) -> Iterator[str]:
    """A local directory for a checkpoint given as a path or a URI (downloaded to a temp dir
    with the cold tier's filesystem settings: endpoint, region, credential variables)."""
    if "://" not in source or source.startswith("file://"):
        path = source[len("file://"):] if source.startswith("file://") else source
        if not Path(path).is_dir():
            raise FileNotFoundError(f"train.resume / resume_from={source!r}: no such checkpoint directory")
        yield path
        return
    from components.data.cold import filesystem_for

    fs, remote = filesystem_for(source, storage)
    if not fs.exists(remote):
        raise FileNotFoundError(f"train.resume / resume_from={source!r}: no such checkpoint")
    with tempfile.TemporaryDirectory(prefix="moeops-resume-") as local:
        fs.get(remote.rstrip("/") + "/", local + "/", recursive=True)
        yield local


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """What Ray Train's TorchTrainer runs on every worker."""
    config, run = unpack_config(config_dict)
    train(config, run, RayTrainSession())
