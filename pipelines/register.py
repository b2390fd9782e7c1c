"""Register stage: a registry version from the train run's LoggedModel, and the champion gate.

    python -m pipelines.register experiment=tiny      # after pipelines.evaluate

The version is created from ``models:/<model_id>``, the model the train stage logged, so the
MLflow UI shows training run -> logged model -> version. It always gets
``registry.challenger_alias``; ``registry.champion_alias`` moves to it only when it beats the
current champion on ``registry.metric`` by ``registry.min_improvement`` (both measured by the
evaluate stage on the same held-out batches). With no earlier champion it moves only when the
MoE's held-out loss is below its dense equivalent's (``registry.require_dense_win``). The
decision and its reason are tags of this run and of the version. The version is also converted to
the Hugging Face layout and logged as this run's artifact ``hf/``
(``components.tracking.hf_artifact``; the version's ``moeops.hf_uri`` tag points at it), so
``mlflow artifacts download -u <moeops.hf_uri>`` gives a directory transformers and vLLM load
without moeops.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from components.tracking.hf_artifact import export_logged_hf, log_hf
from components.tracking.outputs import finite_or_none
from components.tracking.provenance import code_tags
from components.tracking.registry import record_decision, register_logged_model, registration_json
from components.tracking.stages import StageContext, StageSpec
from pipelines._cli import stage_main
from pipelines.outputs import EvaluateOutputs, PrepareOutputs, RegisterOutputs, TrainOutputs


def candidate_metrics(train: TrainOutputs, evaluate: EvaluateOutputs) -> dict[str, float]:
    """The figures recorded on the version: held-out ones from evaluate, training ones prefixed."""
    metrics = {
        "train_val_loss": train.val_loss,
        "train_loss": train.train_loss,
        **{name: evaluate.metric(name) for name in EvaluateOutputs.METRICS},
        "dense_val_loss": evaluate.dense_val_loss,
    }
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def run(ctx: StageContext) -> RegisterOutputs:
    reg = ctx.config.registry
    prepare, train, evaluate = (
        ctx.input(PrepareOutputs),
        ctx.input(TrainOutputs),
        ctx.input(EvaluateOutputs),
    )
    metrics = candidate_metrics(train, evaluate)
    if reg.metric not in metrics:
        raise ValueError(
            f"registry.metric={reg.metric!r}: the evaluate stage measured no finite value "
            f"(it reports {sorted(metrics)})"
        )
    tags = {
        "dataset_digest": prepare.dataset_digest,
        "tokenizer_hash": prepare.tokenizer_hash,
        "model_digest": train.model_digest,
        "git_commit": code_tags()["moeops.git_commit"],
        "training_run_id": ctx.input_run_ids.get("train", ""),
        "evaluate_run_id": ctx.input_run_ids.get("evaluate", ""),
        "register_run_id": ctx.run_id,
        "report_uri": evaluate.report_uri,
    }
    with tempfile.TemporaryDirectory(prefix="moeops-hf-") as hf_tmp:
        # the Hugging Face directory first: a conversion that fails fails before a version exists
        exported = export_logged_hf(train.model_uri, ctx.tracking_uri, Path(hf_tmp) / "hf")
        registration = register_logged_model(
            train.model_id,
            tracking_uri=ctx.tracking_uri,
            registry=reg,
            metrics=metrics,
            tags=tags,
            champion_metric=finite_or_none(evaluate.champion_metric(reg.metric)),
            dense_gate=(evaluate.val_loss, evaluate.dense_val_loss)
            if reg.require_dense_win
            else None,
        )
        record_decision(ctx.client, ctx.run_id, registration)
        ctx.set_tags({f"moeops.version_tag.{k}": v for k, v in tags.items()})
        ctx.log_text(registration_json(registration), "registration.json")
        # the version as a Hugging Face directory (transformers / vLLM): artifact hf/ of this run
        hf = log_hf(ctx.client, ctx.run_id, registration.model_name, registration.version, exported)
    ctx.set_tags(hf.tags())
    print(
        f"[register] Hugging Face directory: {hf.uri} ({hf.architecture})"
        if not hf.refused
        else f"[register] no Hugging Face export: {hf.refused}",
        flush=True,
    )
    print(
        f"[register] {registration.model_uri} from {train.model_uri}: {registration.reason}",
        flush=True,
    )
    return RegisterOutputs(
        model_name=registration.model_name,
        model_version=registration.version,
        model_id=registration.model_id,
        aliases=list(registration.aliases),
        promoted=registration.promoted,
        reason=registration.reason,
        previous_champion=registration.previous_champion or "",
    )


SPEC = StageSpec(
    name="register",
    config_keys=("registry",),
    upstream=(PrepareOutputs, TrainOutputs, EvaluateOutputs),
    fn=run,
    outputs=RegisterOutputs,
)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
