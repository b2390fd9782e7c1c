"""The ``train`` stage: :func:`components.training.ray_runner.run_training`, then the LoggedModel.

Run alone, it reads the latest finished prepare (and tune) run:

    python -m pipelines.train experiment=tiny
    python -m pipelines.train train.stop_at_step=100   # stop early; the same command resumes
"""

from __future__ import annotations

import mlflow

from components.config import Config, flatten, to_container, with_overrides
from components.tracking.stages import StageContext, StageSpec
from pipelines._cli import stage_main
from pipelines.outputs import PrepareOutputs, TrainOutputs, TuneOutputs


def upstream(config: Config) -> tuple[type, ...]:
    return (PrepareOutputs, TuneOutputs) if config.tune.enabled else (PrepareOutputs,)


def model_params(config: Config) -> dict[str, str]:
    """The LoggedModel's params: the model and training config it was trained with (flattened)."""
    from components.tracking.registry import mlflow_param

    container = to_container(config)
    return {
        k: mlflow_param(v)
        for k, v in flatten({"model": container["model"], "train": container["train"]}).items()
    }


def run(ctx: StageContext) -> TrainOutputs:
    from components.model.export import weights_digest
    from components.tracking.datasets import log_dataset_input
    from components.tracking.provenance import code_tags
    from components.tracking.registry import log_model
    from components.training.ray_runner import run_training, training_name
    from pipelines.runtime import ensure_ray

    config = ctx.config
    prepare = ctx.input(PrepareOutputs)
    best = ctx.input(TuneOutputs).best_params if config.tune.enabled else {}
    if best:
        print(f"[train] applying the sweep's best parameters: {best}", flush=True)
        config = with_overrides(config, best)
        ctx.log_params({"tuned": best})
    dataset = prepare.dataset(config.data.name)
    log_dataset_input(ctx.client, ctx.run_id, dataset, prepare.dataset_digest, "training")
    ensure_ray(config)
    result = run_training(
        config,
        prepare.manifest_uri,
        mlflow_run_id=ctx.run_id,
        # the code digest is part of the checkpoint identity: new code never resumes old weights
        name=training_name(config, prepare.manifest_uri, code=ctx.code_digest),
    )
    if result.flow_report_path:
        ctx.log_artifact(result.flow_report_path, "data_flow")
    digest = weights_digest(result.export_dir)
    m = result.metrics
    steps = int(m.get("steps", 0))
    # final figures at the last step, before the model is logged at that step: MLflow links the
    # run's metrics of the model's step to the LoggedModel
    summary = {f"final_{k}": m[k] for k in ("val_loss", "train_loss", "tokens_per_s") if k in m}
    mlflow.log_metrics(summary, step=steps, run_id=ctx.run_id, dataset=dataset)
    model_id = log_model(
        result.export_dir,
        run_id=ctx.run_id,
        tracking_uri=ctx.tracking_uri,
        params=model_params(config),
        step=steps,
        tags={
            "dataset_digest": prepare.dataset_digest,
            "tokenizer_hash": prepare.tokenizer_hash,
            "model_digest": digest,
            "git_commit": code_tags()["moeops.git_commit"],
        },
    )
    nan = float("nan")
    return TrainOutputs(
        model_id=model_id,
        model_digest=digest,
        export_dir=result.export_dir,
        checkpoint_uri=result.checkpoint_path,
        tuned_params=dict(best),
        steps=steps,
        val_loss=m.get("val_loss", nan),
        train_loss=m.get("train_loss", nan),
        tokens_per_s=m.get("tokens_per_s", nan),
        # reported by the training loop's last eval (NaN where it does not report them)
        moe_dropped_fraction=m.get("moe/dropped_fraction", nan),
        moe_load_max_over_mean=m.get("moe/load_max_over_mean", nan),
        comm_exposed_fraction=m.get("comm/exposed_fraction", nan),
    )


SPEC = StageSpec(
    name="train",
    config_keys=("data", "model", "train"),
    upstream=upstream,
    fn=run,
    outputs=TrainOutputs,
    system_metrics=True,
)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
