"""Evaluate stage: the trained MoE, its dense baseline and the current champion on the held-out split.

    python -m pipelines.evaluate experiment=tiny      # after pipelines.train

The three models are scored on the same held-out batches; the report (Markdown + JSON), the
expert-utilisation plot and sample completions are artifacts of this stage's run. The dense
baseline (equal active parameters) is trained here with ``run_training`` in a run nested under
this one; its Ray Train run name is deterministic, so a rerun reuses its checkpoints.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import torch

from components.config import Config, flatten, to_container, with_overrides
from components.evaluation.metrics import ModelEvaluation, evaluate_model
from components.evaluation.plots import plot_expert_utilisation
from components.evaluation.report import report_json, report_markdown
from components.tracking import mlflow_utils
from components.tracking.stages import StageContext, StageSpec, digest_of
from pipelines._cli import stage_main

REPORT_DIR = "evaluation"


def held_out_batches(config: Config, manifest_uri: str) -> list[torch.Tensor]:
    """The first ``evaluate.eval_batches`` batches of the validation split, in a fixed order
    (read through the same warm cache as training: ``storage.warm_dir``)."""
    from components.data.reader import TieredReader

    reader = TieredReader(manifest_uri, split="val", storage=config.storage,
                          seed=config.data.seed, batch_size=config.train.batch_size, shuffle=False)
    batches = []
    for batch in reader:
        batches.append(batch.cpu())
        if len(batches) >= config.evaluate.eval_batches:
            break
    if not batches:
        raise ValueError(f"{manifest_uri}: the validation split yielded no batches")
    return batches


def download_run_export(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """``runs:/<id>/export`` (the train stage's output) -> a local export directory."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri)
    return Path(local)


def tuned_params(ctx: StageContext) -> dict[str, Any]:
    """The sweep's best params the train stage applied (logged there as ``tuned.<key>``)."""
    run_id = ctx.input_run_ids.get("train")
    if not run_id:
        return {}
    params = ctx.client.get_run(run_id).data.params
    out = {}
    for key, value in params.items():
        if key.startswith("tuned."):
            out[key[len("tuned."):]] = json.loads(value) if value[:1] in "[{" else _number(value)
    return out


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def dense_baseline_config(config: Config, moe_model_cfg: dict[str, Any], train_overrides: dict[str, Any],
                          steps: int) -> Config:
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


def train_dense_baseline(ctx: StageContext, manifest_uri: str, moe_model_cfg: dict[str, Any],
                         moe_steps: int) -> tuple[Path, str]:
    """Train the dense baseline in a run nested under this stage's run; returns (export dir, run id)."""
    from pipelines.train import run_training, training_name

    steps = ctx.config.evaluate.dense_max_steps or moe_steps or ctx.config.train.max_steps
    config = dense_baseline_config(ctx.config, moe_model_cfg, tuned_params(ctx), steps)
    run = ctx.client.create_run(ctx.experiment_id, run_name="dense-baseline", tags={
        "mlflow.parentRunId": ctx.run_id, "moeops.stage": "dense-baseline"})
    run_id = run.info.run_id
    container = to_container(config)
    mlflow_utils.log_params(ctx.client, run_id, flatten({"model": container["model"], "train": container["train"]}))
    status = "FAILED"
    try:
        result = run_training(config, manifest_uri, mlflow_run_id=run_id,
                              name=training_name(config, manifest_uri, prefix="dense"))
        status = "FINISHED"
    finally:
        ctx.client.set_terminated(run_id, status)
    return Path(result.export_dir), run_id


def run(ctx: StageContext) -> dict[str, str]:
    from components.model.export import load_export
    from components.tracking.registry import find_version, load_registered
    from pipelines.runtime import ensure_ray

    config, ev = ctx.config, ctx.config.evaluate
    prepare, train = ctx.inputs["prepare"], ctx.inputs["train"]
    manifest_uri = prepare["manifest_uri"]
    batches = held_out_batches(config, manifest_uri)
    common = dict(max_new_tokens=ev.max_new_tokens, throughput_batch_size=ev.throughput_batch_size)
    prompts = list(ev.prompts)

    moe_dir = download_run_export(train["model_uri"], ctx.tracking_uri, ctx.work_dir / "moe")
    moe_loaded = load_export(moe_dir)
    evaluations: list[ModelEvaluation] = [
        evaluate_model("moe", moe_loaded, batches, prompts, source=train["model_uri"], **common)]
    context: dict[str, Any] = {"dataset_digest": prepare.get("dataset_digest") or prepare.get("digest", ""),
                               "held_out_batches": len(batches), "batch_shape": list(batches[0].shape),
                               "training_run_id": ctx.input_run_ids.get("train", "")}

    if ev.compare_dense:
        ensure_ray(config)
        dense_dir, dense_run = train_dense_baseline(ctx, manifest_uri, moe_loaded.model_cfg,
                                                    int(float(train.get("steps", 0) or 0)))
        evaluations.append(evaluate_model("dense_baseline", load_export(dense_dir), batches, prompts,
                                          source=f"runs:/{dense_run}", **common))
        context["dense_baseline_run_id"] = dense_run

    champion_version = ""
    if ev.compare_champion:
        champion_uri = f"models:/{config.registry.model_name}@{config.registry.champion_alias}"
        if find_version(champion_uri, ctx.tracking_uri) is None:
            context["champion"] = f"none ({champion_uri} does not exist yet)"
        else:
            loaded, info = load_registered(champion_uri, ctx.tracking_uri, dst_dir=ctx.work_dir / "champion")
            if loaded.tokenizer.digest != moe_loaded.tokenizer.digest:
                # Other token ids: its loss on these batches would be meaningless.
                context["champion"] = f"{info.model_uri}: trained with another tokenizer, not comparable"
            else:
                evaluations.append(evaluate_model("champion", loaded, batches, prompts,
                                                  source=info.model_uri, **common))
                champion_version = info.version
                context["champion"] = info.model_uri

    out_dir = ctx.work_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(report_markdown(evaluations, context))
    (out_dir / "report.json").write_text(report_json(evaluations, context))
    if evaluations[0].expert_counts:
        plot_expert_utilisation(evaluations[0].expert_counts, out_dir / "expert_utilisation.png",
                                title=f"Expert utilisation on held-out data ({evaluations[0].label})")
    ctx.log_artifact(out_dir, REPORT_DIR)
    metrics = {}
    for e in evaluations:
        prefix = "" if e.label == "moe" else f"{e.label}_"
        metrics.update({f"{prefix}{k}": v for k, v in e.headline().items() if math.isfinite(v)})
    ctx.log_metrics(metrics)

    by_label = {e.label: e for e in evaluations}
    outputs = {
        "report_uri": f"runs:/{ctx.run_id}/{REPORT_DIR}/report.json",
        "val_loss": f"{evaluations[0].val_loss:.6f}",
        "perplexity": f"{evaluations[0].perplexity:.6f}",
        "generation_tokens_per_s": f"{evaluations[0].generation_tokens_per_s:.2f}",
        "dense_val_loss": f"{by_label['dense_baseline'].val_loss:.6f}" if "dense_baseline" in by_label else "",
        "champion_val_loss": f"{by_label['champion'].val_loss:.6f}" if "champion" in by_label else "",
        "champion_perplexity": f"{by_label['champion'].perplexity:.6f}" if "champion" in by_label else "",
        "champion_version": champion_version,
        "model_digest": train.get("digest", ""),
    }
    outputs["digest"] = digest_of({k: outputs[k] for k in ("val_loss", "dense_val_loss", "champion_val_loss",
                                                          "champion_version")} | {"model": train.get("digest")})
    return outputs


def champion_unchanged(config: Config, outputs: dict[str, str]) -> bool:
    """A cached evaluation holds only while the champion it compared against still is the champion."""
    from components.tracking.registry import find_version

    if not config.evaluate.compare_champion:
        return True
    current = find_version(f"models:/{config.registry.model_name}@{config.registry.champion_alias}",
                           config.tracking.uri)
    if (current.version if current else "") == outputs.get("champion_version", ""):
        return True
    # The champion is now the very model this run evaluated (it was promoted from it):
    # comparing it with itself would add nothing, so the evaluation still holds.
    return bool(current) and current.tags.get("model_digest", "") == outputs.get("model_digest", "-")


SPEC = StageSpec(name="evaluate", config_keys=("evaluate", "train", "registry.model_name", "registry.champion_alias"),
                 upstream=("prepare", "train"), fn=run, key_output="val_loss", still_valid=champion_unchanged)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
