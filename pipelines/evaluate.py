"""Evaluate stage: the trained MoE, its dense baseline and the current champion on the held-out
split.

    python -m pipelines.evaluate experiment=tiny      # after pipelines.train

The three models are scored on the same held-out batches; the report (Markdown + JSON), the
expert-utilisation plot and sample completions are artifacts of this stage's run. The dense
baseline (equal active parameters) is trained here with ``run_training`` in a run nested under
this one; its Ray Train run name is deterministic, so a rerun reuses its checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow
import torch

from components.config import Config, flatten, to_container, with_overrides
from components.config.schema import ModelConfig
from components.evaluation.metrics import ModelEvaluation, evaluate_model
from components.evaluation.plots import plot_expert_utilisation
from components.evaluation.report import report_json, report_markdown
from components.tracking import mlflow_utils
from components.tracking.stages import StageContext, StageSpec, final_status
from pipelines._cli import stage_main
from pipelines.outputs import EvaluateOutputs, PrepareOutputs, TrainOutputs

REPORT_DIR = "evaluation"


def held_out_batches(config: Config, manifest_uri: str) -> list[torch.Tensor]:
    """``evaluate.eval_batches`` batches of validation rows spread evenly over the whole split
    (``TieredReader.iter_eval``: every shard, not the first few documents; the same rows for every
    model), read through the same warm cache as training (``storage.warm_dir``)."""
    from components.data.reader import TieredReader

    reader = TieredReader(
        manifest_uri,
        split="val",
        storage=config.storage,
        seed=config.data.seed,
        batch_size=config.train.batch_size,
        shuffle=False,
    )
    try:
        batches = [b.cpu() for b in reader.iter_eval(config.evaluate.eval_batches)]
    finally:
        reader.close()
    if not batches:
        raise ValueError(f"{manifest_uri}: the validation split yielded no batches")
    return batches


def download_model_export(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """``models:/<model_id>`` (the train stage's LoggedModel) -> a local export directory."""
    from components.tracking.registry import download_logged_export

    return download_logged_export(model_uri, tracking_uri, dst)


def dense_baseline_config(
    config: Config, moe_model_cfg: ModelConfig, train_overrides: dict[str, Any], steps: int
) -> Config:
    """Same data and optimisation, ``model.kind=dense`` with equal active parameters."""
    from components.model.transformer import dense_equivalent

    dense = dense_equivalent(moe_model_cfg)
    overrides = {f"model.{k}": v for k, v in vars(dense).items()}
    overrides.update({k: v for k, v in train_overrides.items() if k.startswith("train.")})
    overrides["train.expert_parallel_size"] = 1  # a dense model has no experts to shard
    overrides["train.max_steps"] = steps
    if config.train.warmup_steps >= steps:
        overrides["train.warmup_steps"] = steps // 4
    return with_overrides(config, overrides)


def train_dense_baseline(
    ctx: StageContext, manifest_uri: str, moe_model_cfg: ModelConfig, moe_steps: int
) -> tuple[Path, str]:
    """Train the dense baseline in a run nested under this stage's run; returns (export dir, run
    id)."""
    from components.training.ray_runner import run_training, training_name

    steps = ctx.config.evaluate.dense_max_steps or moe_steps or ctx.config.train.max_steps
    config = dense_baseline_config(
        ctx.config, moe_model_cfg, ctx.input(TrainOutputs).tuned_params, steps
    )
    run = ctx.client.create_run(
        ctx.experiment_id,
        run_name="dense-baseline",
        tags={"mlflow.parentRunId": ctx.run_id, "moeops.stage": "dense-baseline"},
    )
    run_id = run.info.run_id
    container = to_container(config)
    mlflow_utils.log_params(
        ctx.client, run_id, flatten({"model": container["model"], "train": container["train"]})
    )
    error: BaseException | None = None
    try:
        result = run_training(
            config,
            manifest_uri,
            mlflow_run_id=run_id,
            name=training_name(config, manifest_uri, code=ctx.code_digest, prefix="dense"),
        )
    except BaseException as err:
        error = err
        raise
    finally:
        ctx.client.set_terminated(run_id, final_status(error))
    return Path(result.export_dir), run_id


def run(ctx: StageContext) -> EvaluateOutputs:
    from components.model.export import load_export
    from components.tracking.registry import find_version, load_registered
    from pipelines.runtime import ensure_ray

    config, ev = ctx.config, ctx.config.evaluate
    prepare, train = ctx.input(PrepareOutputs), ctx.input(TrainOutputs)
    batches = held_out_batches(config, prepare.manifest_uri)

    def evaluate(label: str, loaded, source: str) -> ModelEvaluation:
        return evaluate_model(label, loaded, batches, source=source, evaluation=ev)

    moe_loaded = load_export(
        download_model_export(train.model_uri, ctx.tracking_uri, ctx.work_dir / "moe")
    )
    evaluations: list[ModelEvaluation] = [evaluate("moe", moe_loaded, train.model_uri)]
    context: dict[str, Any] = {
        "dataset_digest": prepare.dataset_digest,
        "model_id": train.model_id,
        "held_out_batches": len(batches),
        "batch_shape": list(batches[0].shape),
        "training_run_id": ctx.input_run_ids.get("train", ""),
    }

    if ev.compare_dense:
        ensure_ray(config)
        dense_dir, dense_run = train_dense_baseline(
            ctx, prepare.manifest_uri, moe_loaded.model_cfg, train.steps
        )
        evaluations.append(evaluate("dense_baseline", load_export(dense_dir), f"runs:/{dense_run}"))
        context["dense_baseline_run_id"] = dense_run

    if ev.compare_champion:
        champion_uri = f"models:/{config.registry.model_name}@{config.registry.champion_alias}"
        if find_version(champion_uri, ctx.tracking_uri) is None:
            context["champion"] = f"none ({champion_uri} does not exist yet)"
        else:
            loaded, info = load_registered(
                champion_uri, ctx.tracking_uri, dst_dir=ctx.work_dir / "champion"
            )
            if loaded.tokenizer.digest != moe_loaded.tokenizer.digest:
                # Other token ids: its loss on these batches would be meaningless.
                context["champion"] = (
                    f"{info.model_uri}: trained with another tokenizer, not comparable"
                )
            else:
                evaluations.append(evaluate("champion", loaded, info.model_uri))
                context["champion"] = info.model_uri
                context["champion_version"] = info.version

    out_dir = ctx.work_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(report_markdown(evaluations, context))
    (out_dir / "report.json").write_text(report_json(evaluations, context))
    if evaluations[0].expert_counts:
        plot_expert_utilisation(
            evaluations[0].expert_counts,
            out_dir / "expert_utilisation.png",
            title=f"Expert utilisation on held-out data ({evaluations[0].label})",
        )
    ctx.log_artifact(out_dir, REPORT_DIR)

    # The trained model's held-out figures, linked to its LoggedModel and to the dataset they were
    # measured on; the comparison models' figures are run metrics with their label as prefix.
    by_label = {e.label: e for e in evaluations}
    dataset = prepare.dataset(config.data.name)
    mlflow.log_metrics(
        finite(by_label["moe"].headline()),
        run_id=ctx.run_id,
        model_id=train.model_id,
        dataset=dataset,
    )
    ctx.log_metrics(
        {f"{e.label}_{k}": v for e in evaluations[1:] for k, v in finite(e.headline()).items()}
    )

    nan = float("nan")
    moe, dense, champion = by_label["moe"], by_label.get("dense_baseline"), by_label.get("champion")
    outputs = EvaluateOutputs(
        report_uri=f"runs:/{ctx.run_id}/{REPORT_DIR}/report.json",
        model_digest=train.model_digest,
        dataset_digest=prepare.dataset_digest,
        val_loss=moe.val_loss,
        perplexity=moe.perplexity,
        generation_tokens_per_s=moe.generation_tokens_per_s,
        dense_val_loss=dense.val_loss if dense else nan,
        champion_version=context.get("champion_version", ""),
        champion_val_loss=champion.val_loss if champion else nan,
        champion_perplexity=champion.perplexity if champion else nan,
        champion_generation_tokens_per_s=champion.generation_tokens_per_s if champion else nan,
    )
    if dense is not None:
        # the issue-16 question, answered on the run: did the MoE beat its dense equivalent?
        ctx.log_metrics({"moe_minus_dense_val_loss": outputs.moe_minus_dense_val_loss})
        ctx.set_tags({"moeops.moe_vs_dense": outputs.dense_verdict()})
        print(f"[evaluate] vs dense equivalent: {outputs.dense_verdict()}", flush=True)
    return outputs


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def champion_unchanged(config: Config, outputs: EvaluateOutputs) -> bool:
    """A cached evaluation holds only while the champion it compared against still is the
    champion."""
    from components.tracking.registry import find_version

    if not config.evaluate.compare_champion:
        return True
    current = find_version(
        f"models:/{config.registry.model_name}@{config.registry.champion_alias}",
        config.tracking.uri,
    )
    if (current.version if current else "") == outputs.champion_version:
        return True
    # The champion is now the very model this run evaluated (it was promoted from it):
    # comparing it with itself would add nothing, so the evaluation still holds.
    return bool(current) and current.tags.get("model_digest", "") == outputs.model_digest


SPEC = StageSpec(
    name="evaluate",
    config_keys=("evaluate", "train", "registry.model_name", "registry.champion_alias"),
    upstream=(PrepareOutputs, TrainOutputs),
    fn=run,
    outputs=EvaluateOutputs,
    still_valid=champion_unchanged,
)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
