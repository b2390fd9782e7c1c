"""Register stage: log the trained model to MLflow, register a version, and gate the champion alias.

    python -m pipelines.register experiment=tiny      # after pipelines.evaluate

The new version always gets ``registry.challenger_alias``; ``registry.champion_alias`` moves to
it only when it beats the current champion on ``registry.metric`` by ``registry.min_improvement``
(both measured by the evaluate stage on the same held-out batches). The decision and its reason
are tags of this run and of the version.
"""
from __future__ import annotations

import math

from components.tracking.provenance import code_tags
from components.tracking.registry import log_and_register, registration_json
from components.tracking.stages import StageContext, StageSpec, digest_of
from pipelines._cli import stage_main
from pipelines.evaluate import download_run_export


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def candidate_metrics(train: dict[str, str], evaluate: dict[str, str]) -> dict[str, float]:
    """The figures recorded on the version (held-out ones from evaluate take precedence)."""
    metrics = {
        "train_val_loss": _float(train.get("val_loss")),
        "train_loss": _float(train.get("train_loss")),
        "val_loss": _float(evaluate.get("val_loss")),
        "perplexity": _float(evaluate.get("perplexity")),
        "generation_tokens_per_s": _float(evaluate.get("generation_tokens_per_s")),
        "dense_val_loss": _float(evaluate.get("dense_val_loss")),
    }
    return {k: v for k, v in metrics.items() if v is not None}


def run(ctx: StageContext) -> dict[str, str]:
    reg = ctx.config.registry
    prepare, train, evaluate = ctx.inputs["prepare"], ctx.inputs["train"], ctx.inputs["evaluate"]
    metrics = candidate_metrics(train, evaluate)
    if reg.metric not in metrics:
        raise ValueError(f"registry.metric={reg.metric!r}: the evaluate/train stages report {sorted(metrics)}")
    export_dir = download_run_export(train["model_uri"], ctx.tracking_uri, ctx.work_dir / "export")
    commit = code_tags()["moeops.git_commit"]
    tags = {
        "dataset_digest": prepare.get("dataset_digest") or prepare.get("digest", ""),
        "tokenizer_hash": prepare.get("tokenizer_hash", ""),
        "git_commit": commit,
        "training_run_id": ctx.input_run_ids.get("train", ""),
        "evaluate_run_id": ctx.input_run_ids.get("evaluate", ""),
        "register_run_id": ctx.run_id,
        "model_digest": train.get("model_digest") or train.get("digest", ""),
        "report_uri": evaluate.get("report_uri", ""),
        "source_model_uri": train["model_uri"],
    }
    registration = log_and_register(
        export_dir, run_id=ctx.run_id, tracking_uri=ctx.tracking_uri, model_name=reg.model_name,
        metric=reg.metric, metrics=metrics, tags=tags,
        champion_metric=_float(evaluate.get(f"champion_{reg.metric}")),
        mode=reg.mode, min_improvement=reg.min_improvement,
        champion_alias=reg.champion_alias, challenger_alias=reg.challenger_alias,
    )
    ctx.set_tags({f"moeops.version_tag.{k}": v for k, v in tags.items()})
    ctx.log_text(registration_json(registration), "registration.json")
    print(f"[register] {registration.model_uri}: {registration.reason}", flush=True)
    return {
        "model_name": registration.model_name,
        "model_version": registration.version,
        "model_uri": registration.model_uri,
        "alias": ",".join(registration.aliases),
        "promoted": str(registration.promoted).lower(),
        "reason": registration.reason,
        "previous_champion": registration.previous_champion or "",
        "digest": digest_of({"model": registration.model_uri, "aliases": registration.aliases}),
    }


SPEC = StageSpec(name="register", config_keys=("registry",), upstream=("prepare", "train", "evaluate"),
                 fn=run, key_output="promoted")
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
