"""Quality benchmark: the MoE against its dense equivalent at equal active parameters and equal
tokens, each at its own best learning rate and FFN init.

    python tests/benchmarks/bench_quality.py --json bench-quality.json       # ~18 min, 2 idle cores
    python tests/benchmarks/bench_quality.py --quick --json /tmp/q.json        # smoke run (seconds)
    python tests/benchmarks/bench_quality.py --ablate \\
        --variant base: --variant dropless:model.dropless=true --lr 0.003 --json rows.json

One process, no Ray: the project's own data reader (``TieredReader`` over the stdlib corpus as
``prepare`` packs it), model (``Transformer`` / ``dense_equivalent``), loss, optimizer, schedule and
step (``components.training.step.train_step``), so a row costs seconds to minutes of CPU.

The two models train in *lockstep*: one batch, the MoE's step and the dense step on it (the order
alternates every step), so both see the same tokens in the same order and machine load hits both
step times alike (``moe_step_time_vs_dense`` is a ratio of medians measured side by side). Every
``--eval-every`` steps both are evaluated on the same held-out rows (``iter_eval``: rows spread
evenly over every validation shard, not the split's first shard). Every output key comes from
these logged curves (:func:`summarise`); the curves, the loss-vs-tokens plot and the keys go to
one MLflow run.

Learning rate and FFN init: a small sweep over ``--lrs`` x ``--init-scales`` (values of
``model.ffn_out_init_scale``, the factor on every FFN down projection's init, which moves the
dense model's loss far more than the MoE's: docs/model.md): every (lr, scale, seed) trains in
lockstep, ``--jobs`` processes at a time; each model keeps the (lr, scale) with its lowest final
val loss averaged over ``--seeds``, and the figures compare the two at their own settings seed by
seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from components.config import load_config
from components.config.schema import Config
from components.model.transformer import Transformer, dense_equivalent
from components.training.metrics import IntervalMetrics
from components.training.optim import build_optimizer, build_scheduler
from components.training.parallel import build_groups
from components.training.step import StepParts, build_balancer, train_step

GOALS = {
    "moe_minus_dense_val_loss": "< 0 (every seed)",
    "tokens_to_dense_final_loss_ratio": "<= 0.8",
}

# The default size: the main job's model and data (conf/model/moe_tiny.yaml, conf/data/stdlib
# .yaml), one process with the main job's global batch (2 workers x 8 sequences).
DEFAULT_OVERRIDES: list[str] = ["train.batch_size=16"]
QUICK_OVERRIDES: list[str] = [
    "data.max_files=20",
    "data.max_bytes=300000",
    "data.vocab_size=512",
    "data.seq_len=64",
    "model.dim=32",
    "model.ffn_dim=64",
    "model.max_seq_len=128",
    "train.batch_size=4",
    "serve.max_prompt_tokens=64",
    "serve.max_tokens=32",
]


@dataclass
class Curve:
    """One model's logged curve: validation loss at ``tokens`` (training tokens seen so far) and
    the cumulative training wall time (steps only, evaluation excluded) at those points."""

    name: str
    lr: float
    seed: int
    ffn_out_init_scale: float = 1.0
    tokens: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # every step's wall time
    dropped_fraction: list[float] = field(default_factory=list)  # per eval interval (MoE)
    load_max_over_mean: list[float] = field(default_factory=list)  # per eval interval (MoE)

    @property
    def final(self) -> float:
        return self.val_loss[-1]


class Trainee:
    """One model with its optimizer, schedule and step state, trained one batch at a time."""

    def __init__(self, name: str, config: Config, vocab_size: int, seed: int):
        torch.manual_seed(seed)
        self.config = config
        self.model = Transformer(config.model, vocab_size)
        t = config.train
        optimizer = build_optimizer(self.model, t)
        self.parts = StepParts(
            self.model,
            self.model,
            optimizer,
            build_scheduler(optimizer, t),
            build_groups(1),
            t.grad_clip,
            balancer=build_balancer(self.model, optimizer),
        )
        self.metrics = IntervalMetrics(torch.device("cpu"))
        self.curve = Curve(name, t.lr, seed, config.model.ffn_out_init_scale)
        self.wall = 0.0

    def step(self, batch: torch.Tensor) -> None:
        start = time.perf_counter()
        train_step(self.parts, [batch], 1, self.metrics)
        elapsed = time.perf_counter() - start
        self.wall += elapsed
        self.curve.step_s.append(elapsed)

    @torch.no_grad()
    def evaluate(self, val_batches: list[torch.Tensor], tokens: int) -> None:
        self.model.eval()
        total, count = 0.0, 0
        for batch in val_batches:
            logits, _ = self.model(batch[:, :-1])
            targets = batch[:, 1:]
            total += float(
                F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    reduction="sum",
                )
            )
            count += targets.numel()
        self.model.train()
        metrics, _ = self.metrics.read(build_groups(1))
        c = self.curve
        c.tokens.append(tokens)
        c.val_loss.append(total / count)
        c.wall_s.append(self.wall)
        if self.config.model.kind == "moe":
            c.dropped_fraction.append(metrics["moe/dropped_fraction"])
            c.load_max_over_mean.append(metrics["moe/load_max_over_mean"])


def prepare(root: Path, overrides: list[str]):
    """The dataset as the ``prepare`` stage packs it (reused when already in ``root``)."""
    from components.data.build import prepare_dataset

    config = load_config(_base(root, overrides))
    return prepare_dataset(config.data, config.storage).manifest


def _base(root: Path, overrides: list[str]) -> list[str]:
    return [
        f"paths.root={root}",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
        "train.num_workers=1",
        "train.expert_parallel_size=1",
        "tune.trial_num_workers=1",
        *overrides,
    ]


def configs(root: Path, overrides: list[str], steps: int, lr: float) -> Config:
    # warmup 10% of the run, as the main job (20 of 200 steps)
    warmup = max(1, steps // 10)
    return load_config(
        _base(root, overrides)
        + [f"train.max_steps={steps}", f"train.lr={lr}", f"train.warmup_steps={warmup}"]
    )


def with_model(config: Config, model) -> Config:
    import dataclasses

    return dataclasses.replace(config, model=model)


def train_lockstep(
    runs: dict[str, Config],
    manifest,
    seed: int,
    steps: int,
    eval_every: int,
    eval_batches: int,
) -> dict[str, Curve]:
    """Train every config on the same batches, one step each per batch (alternating order), and
    evaluate all on the same held-out rows every ``eval_every`` steps and at the end."""
    from components.data.reader import TieredReader

    first = next(iter(runs.values()))
    reader_args = dict(
        storage=first.storage,
        cache_dir=first.storage.warm_dir,
        seed=first.data.seed + seed,
        batch_size=first.train.batch_size,
        prefetch_batches=2,
        shuffle_block_shards=first.data.shuffle_block_shards,
    )
    val = TieredReader(manifest.uri, "val", **reader_args)
    val_batches = list(val.iter_eval(eval_batches))
    val.close()
    trainees = [Trainee(name, cfg, manifest.vocab_size, seed) for name, cfg in runs.items()]
    reader = TieredReader(manifest.uri, "train", **reader_args)
    tokens_per_step = first.train.batch_size * manifest.seq_len
    try:
        batches = reader.iter_steps()
        for step in range(1, steps + 1):
            batch = next(batches)
            order = trainees if step % 2 else trainees[::-1]
            for trainee in order:
                trainee.step(batch)
            if step % eval_every == 0 or step == steps:
                for trainee in trainees:
                    trainee.evaluate(val_batches, step * tokens_per_step)
                losses = " ".join(f"{t.curve.name}={t.curve.val_loss[-1]:.4f}" for t in trainees)
                print(f"  seed {seed} step {step}: {losses}", flush=True)
    finally:
        reader.close()
    return {t.curve.name: t.curve for t in trainees}


# ----------------------------------------------------------------------------- summary


def tokens_to_reach(curve: Curve, target: float, axis: str = "tokens") -> float:
    """The first point (tokens, or training seconds with ``axis="wall_s"``) where ``curve``'s
    validation loss reaches ``target``, linearly interpolated between its logged points; NaN if
    it never does."""
    xs = getattr(curve, axis)
    prev_x, prev_y = 0.0, math.inf
    for x, y in zip(xs, curve.val_loss):
        if y <= target:
            if not math.isfinite(prev_y):
                return float(x)
            return prev_x + (x - prev_x) * (prev_y - target) / (prev_y - y)
        prev_x, prev_y = float(x), y
    return math.nan


def summarise(moe: Curve, dense: Curve) -> dict[str, float]:
    """The benchmark's figures for one seed, each computed from the two logged curves."""
    if moe.tokens != dense.tokens:
        raise ValueError("the MoE and dense curves were not logged at the same tokens")
    target = dense.final
    moe_step = statistics.median(moe.step_s)
    dense_step = statistics.median(dense.step_s)
    return {
        "moe_val_loss": moe.final,
        "dense_val_loss": dense.final,
        "moe_minus_dense_val_loss": moe.final - dense.final,
        "tokens_to_dense_final_loss_ratio": tokens_to_reach(moe, target) / dense.tokens[-1],
        "wall_to_dense_final_loss_ratio": tokens_to_reach(moe, target, "wall_s") / dense.wall_s[-1],
        "moe_step_time_vs_dense": moe_step / dense_step,
        "moe_step_s_median": moe_step,
        "dense_step_s_median": dense_step,
        "expert_load_max_over_mean": statistics.fmean(moe.load_max_over_mean),
        "dropped_fraction": statistics.fmean(moe.dropped_fraction),
        "tokens": float(dense.tokens[-1]),
    }


def spread(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min, max and sample standard deviation of every key over the seeds."""
    out = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        finite = [v for v in values if math.isfinite(v)]
        out[key] = {
            "mean": statistics.fmean(finite) if finite else math.nan,
            "min": min(finite) if finite else math.nan,
            "max": max(finite) if finite else math.nan,
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "n": len(finite),
        }
    return out


def plot_curves(curves: list[tuple[Curve, Curve]], out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.evaluation.plots import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for moe, dense in curves:
        ax.plot(moe.tokens, moe.val_loss, color="tab:blue", alpha=0.8, label=f"MoE seed {moe.seed}")
        ax.plot(
            dense.tokens,
            dense.val_loss,
            color="tab:orange",
            alpha=0.8,
            label=f"dense seed {dense.seed}",
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    moe, dense = curves[0]
    ax.set_title(
        f"MoE (lr {moe.lr:g}, FFN out init x{moe.ffn_out_init_scale:g}) vs dense equivalent "
        f"(lr {dense.lr:g}, x{dense.ffn_out_init_scale:g})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def log_to_mlflow(
    tracking_uri: str,
    result: dict,
    curves: list[tuple[Curve, Curve]],
    out_dir,
    artifact_location: str | None = None,
):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    name = "moeops-bench-quality"
    if artifact_location and mlflow.get_experiment_by_name(name) is None:
        # beside the sqlite store, not in ./mlruns of whatever directory the bench ran from
        mlflow.create_experiment(name, artifact_location=artifact_location)
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name="bench-quality") as run:
        mlflow.log_params({k: v for k, v in result["settings"].items() if not isinstance(v, list)})
        for moe, dense in curves:
            for curve in (moe, dense):
                prefix = f"{'moe' if curve is moe else 'dense'}_seed{curve.seed}"
                for tokens, loss in zip(curve.tokens, curve.val_loss):
                    mlflow.log_metric(f"{prefix}/val_loss", loss, step=tokens)
        mlflow.log_metrics({k: v["mean"] for k, v in result["spread"].items()})
        mlflow.log_artifact(str(plot_curves(curves, Path(out_dir) / "loss_vs_tokens.png")))
        mlflow.log_dict(result, "bench_quality.json")
        return run.info.run_id


# ----------------------------------------------------------------------------- modes


def _pair(
    root: Path,
    overrides: list[str],
    steps: int,
    lr: float,
    scale: float,
    seed: int,
    every: int,
    batches: int,
) -> tuple[Curve, Curve]:
    """The MoE and its dense equivalent at one (lr, FFN init scale, seed), in lockstep (one
    process's job)."""
    torch.set_num_threads(1)
    overrides = [*overrides, f"model.ffn_out_init_scale={scale}"]
    manifest = prepare(root, overrides)
    moe_cfg = configs(root, overrides, steps, lr)
    runs = {"moe": moe_cfg, "dense": with_model(moe_cfg, dense_equivalent(moe_cfg.model))}
    curves = train_lockstep(runs, manifest, seed, steps, every, batches)
    return curves["moe"], curves["dense"]


def benchmark(args, root: Path, overrides: list[str]) -> dict:
    """Every (lr, FFN init scale, seed) in lockstep, ``--jobs`` processes at a time; each model
    then keeps the (lr, scale) with the lowest final val loss averaged over the seeds, and the
    figures compare the two at their own settings seed by seed (same seed = same batches in the
    same order)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    prepare(root, overrides)  # once, before the jobs read it
    steps, seeds = args.steps, args.seeds
    settings = [(lr, scale) for scale in args.init_scales for lr in args.lrs]
    grid = [(lr, scale, seed) for lr, scale in settings for seed in seeds]
    job = (root, overrides, steps)
    tail = (args.eval_every, args.eval_batches)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_pair, *job, *key, *tail) for key in grid]
            results = [f.result() for f in futures]
    else:
        results = [_pair(*job, *key, *tail) for key in grid]
    by_key = dict(zip(grid, results))

    def mean_final(setting: tuple[float, float], which: int) -> float:
        return statistics.fmean(by_key[(*setting, seed)][which].final for seed in seeds)

    moe_best = min(settings, key=lambda setting: mean_final(setting, 0))
    dense_best = min(settings, key=lambda setting: mean_final(setting, 1))
    print(
        "sweep (lr, FFN out init scale): final val loss, mean over seeds, MoE / dense:",
        {
            f"{lr:g} x{scale:g}": (
                round(mean_final((lr, scale), 0), 4),
                round(mean_final((lr, scale), 1), 4),
            )
            for lr, scale in settings
        },
        flush=True,
    )
    pairs = [(by_key[(*moe_best, seed)][0], by_key[(*dense_best, seed)][1]) for seed in seeds]
    per_seed = [summarise(m, d) for m, d in pairs]
    # step time: measured side by side within each lockstep run (alternating order), so machine
    # load hits both alike; the median over all runs of the sweep
    step_ratio = statistics.median(
        statistics.median(m.step_s) / statistics.median(d.step_s) for m, d in results
    )
    for row in per_seed:
        row["moe_step_time_vs_dense"] = step_ratio
    return {
        "settings": {
            "overrides": overrides,
            "steps": steps,
            "seeds": seeds,
            "lrs": args.lrs,
            "init_scales": args.init_scales,
            "moe_lr": moe_best[0],
            "dense_lr": dense_best[0],
            "moe_ffn_out_init_scale": moe_best[1],
            "dense_ffn_out_init_scale": dense_best[1],
            "eval_every": args.eval_every,
            "eval_batches": args.eval_batches,
            "tokens_per_step": pairs[0][0].tokens[-1] // steps,
        },
        "sweep": [
            {
                "lr": lr,
                "ffn_out_init_scale": scale,
                "seed": seed,
                "moe_val_loss": by_key[lr, scale, seed][0].final,
                "dense_val_loss": by_key[lr, scale, seed][1].final,
                # every curve of the sweep, not only the chosen settings' (ablation rows reuse them)
                "tokens": by_key[lr, scale, seed][0].tokens,
                "moe_curve": by_key[lr, scale, seed][0].val_loss,
                "dense_curve": by_key[lr, scale, seed][1].val_loss,
            }
            for lr, scale, seed in grid
        ],
        "per_seed": per_seed,
        "spread": spread(per_seed),
        **{k: statistics.fmean(s[k] for s in per_seed) for k in per_seed[0]},
        "curves": [[asdict(m), asdict(d)] for m, d in pairs],
        "_pairs": pairs,
    }


def ablate(args, root: Path, overrides: list[str]) -> dict:
    """Each ``--variant NAME:OVERRIDE,OVERRIDE`` trained at ``--lr`` on every seed (in lockstep
    with the others of the same seed); ``dense`` names the dense equivalent of the base model."""
    manifest = prepare(root, overrides)
    rows: dict[str, list[Curve]] = {}
    for seed in args.seeds:
        runs = {}
        for variant in args.variant:
            name, _, extra = variant.partition(":")
            extra_list = [o for o in extra.split(",") if o]
            cfg = configs(root, overrides + extra_list, args.steps, args.lr)
            if name.startswith("dense"):
                cfg = with_model(cfg, dense_equivalent(cfg.model))
            runs[name] = cfg
        curves = train_lockstep(
            runs, manifest, seed, args.steps, args.eval_every, args.eval_batches
        )
        for name, curve in curves.items():
            rows.setdefault(name, []).append(curve)
            print(f"seed {seed} {name}: {curve.final:.4f}", flush=True)
    out = {}
    for name, curves in rows.items():
        finals = [c.final for c in curves]
        moe = [c for c in curves if c.dropped_fraction]
        out[name] = {
            "val_loss_mean": statistics.fmean(finals),
            "val_loss_per_seed": finals,
            "step_s_median": statistics.median(s for c in curves for s in c.step_s),
            "dropped_fraction": statistics.fmean(c.dropped_fraction[-1] for c in moe)
            if moe
            else None,
            "load_max_over_mean": statistics.fmean(c.load_max_over_mean[-1] for c in moe)
            if moe
            else None,
        }
    return {
        "settings": {
            "overrides": overrides,
            "steps": args.steps,
            "lr": args.lr,
            "seeds": args.seeds,
        },
        "rows": out,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--quick", action="store_true", help="tiny model and budget (smoke test)")
    parser.add_argument("--root", type=Path, help="dataset and MLflow store (default: a tempdir)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite in --root)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-batches", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--lrs", type=float, nargs="+", default=None)
    parser.add_argument(
        "--init-scales",
        type=float,
        nargs="+",
        default=None,
        help="model.ffn_out_init_scale values, swept with --lrs (each model keeps its best pair)",
    )
    parser.add_argument("--override", action="append", default=[], help="extra config override")
    parser.add_argument("--ablate", action="store_true", help="ablation rows instead")
    parser.add_argument("--variant", action="append", default=[], help="NAME:OVERRIDE,...")
    parser.add_argument("--lr", type=float, default=3e-3, help="--ablate: one lr for every row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--jobs", type=int, default=2, help="lockstep runs in parallel")
    args = parser.parse_args(argv)
    # one thread: on a shared machine a second thread per process mostly waits for a core
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.steps = args.steps or (12 if quick else 200)
    args.eval_every = args.eval_every or (4 if quick else 25)
    args.eval_batches = args.eval_batches or (2 if quick else 8)
    args.seeds = args.seeds or [0, 1]
    args.lrs = args.lrs or ([3e-3, 1e-2] if quick else [2e-3, 3e-3, 4e-3, 6e-3])
    args.init_scales = args.init_scales or ([1.0, 4.0] if quick else [1.0, 8.0])
    overrides = (QUICK_OVERRIDES if quick else DEFAULT_OVERRIDES) + args.override

    with tempfile.TemporaryDirectory() as tmp:
        root = (args.root or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if args.ablate:
            result = ablate(args, root, overrides)
        else:
            result = benchmark(args, root, overrides)
            pairs = result.pop("_pairs")
            tracking = args.tracking_uri or f"sqlite:///{root}/mlflow.db"
            artifacts = None if args.tracking_uri else (root / "mlartifacts").as_uri()
            result["mlflow_run_id"] = log_to_mlflow(tracking, result, pairs, root, artifacts)
            result["goals"] = GOALS
        result["wall_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2, default=float)
    if args.json:
        args.json.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
