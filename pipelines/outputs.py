"""What each stage hands to the next: one typed dataclass per stage, declared here once.

The runner (``components.tracking.stages``) records these on the stage's MLflow run
(``outputs.json``, plus a ``moeops.out.<field>`` tag per field for the UI) and reads them back
typed; downstream stages take them from ``ctx.input(PrepareOutputs)`` etc. Floats that a stage
could not measure are NaN, never a missing key. ``cache_digest`` is what downstream cache keys
hold: a content digest where one exists (dataset, weights), so an identical recomputed result
still lets later stages be reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from components.config.schema import RegistryMetric
from components.tracking.outputs import StageOutputs, digest_of


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def _num(value: float, fmt: str = ".4f") -> str:
    return format(value, fmt) if math.isfinite(value) else "n/a"


@dataclass(frozen=True)
class PrepareOutputs(StageOutputs):
    stage: ClassVar[str] = "prepare"

    manifest_uri: str  # the dataset's manifest in the cold tier
    dataset_digest: str  # content digest of every shard (and the tokenizer)
    tokenizer_uri: str
    tokenizer_hash: str
    vocab_size: int
    seq_len: int
    train_rows: int
    val_rows: int

    def cache_digest(self) -> str:
        return self.dataset_digest

    def headline(self) -> str:
        rows = f"{self.train_rows} train / {self.val_rows} val rows"
        return f"dataset {self.dataset_digest[:12]}: {rows}"

    def dataset(self, name: str):
        """The prepared dataset as an MLflow dataset (``name``: ``data.name``): an input of the
        prepare and train runs, and the dataset the evaluate stage's metrics are linked to."""
        from components.tracking.datasets import dataset_entity

        return dataset_entity(
            f"{name}-{self.dataset_digest[:12]}",
            self.dataset_digest,
            self.manifest_uri,
            profile={
                "train_rows": self.train_rows,
                "val_rows": self.val_rows,
                "seq_len": self.seq_len,
                "vocab_size": self.vocab_size,
            },
        )


@dataclass(frozen=True)
class TuneOutputs(StageOutputs):
    stage: ClassVar[str] = "tune"

    enabled: bool  # false with tune=off (then nothing else is set)
    metric: str  # tune.metric
    best_params: dict[str, Any]  # dotted config key -> the best trial's value
    best_metric: float
    best_trial_run_id: str
    num_trials: int
    num_completed: int
    num_stopped_early: int
    num_errored: int
    sweep_dir: str

    def cache_digest(self) -> str:
        return digest_of({"best_params": self.best_params})

    def headline(self) -> str:
        if not self.enabled:
            return "sweep off"
        return (
            f"best {self.metric}={_num(self.best_metric)} of {self.num_trials} trials "
            f"({self.num_stopped_early} stopped early, {self.num_errored} errored)"
        )


@dataclass(frozen=True)
class TrainOutputs(StageOutputs):
    stage: ClassVar[str] = "train"

    model_id: str  # the MLflow LoggedModel this run logged (models:/<model_id>)
    model_digest: str  # digest of the exported weights
    export_dir: str  # the export on the driver's disk (a download skips it when present)
    checkpoint_uri: str  # latest Ray Train checkpoint (resume)
    tuned_params: dict[
        str, Any
    ]  # the sweep's best params applied on top of the config ({} without)
    steps: int
    val_loss: float
    train_loss: float
    tokens_per_s: float
    moe_dropped_fraction: float  # tokens dropped by expert capacity (last eval window)
    moe_load_max_over_mean: float  # busiest expert's load over the mean load (1.0 = balanced)
    comm_exposed_fraction: (
        float  # exposed all-to-all time over total all-to-all time (0 = fully hidden)
    )

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_id}"

    def cache_digest(self) -> str:
        return self.model_digest

    def headline(self) -> str:
        return (
            f"val_loss={_num(self.val_loss)}  expert load "
            f"max/mean={_num(self.moe_load_max_over_mean, '.2f')}  "
            f"dropped={_pct(self.moe_dropped_fraction)}  exposed "
            f"comm={_pct(self.comm_exposed_fraction)}"
        )


@dataclass(frozen=True)
class EvaluateOutputs(StageOutputs):
    stage: ClassVar[str] = "evaluate"

    report_uri: str
    model_digest: str  # the evaluated model (train's), see pipelines.evaluate.champion_unchanged
    dataset_digest: str  # the held-out split's dataset
    val_loss: float
    perplexity: float
    generation_tokens_per_s: float
    dense_val_loss: float  # NaN without evaluate.compare_dense
    champion_version: str  # "" when no comparable champion was evaluated
    champion_val_loss: float  # NaN without a champion
    champion_perplexity: float
    champion_generation_tokens_per_s: float

    # the figures registry.metric may name
    METRICS: ClassVar[tuple[str, ...]] = tuple(RegistryMetric)

    def metric(self, name: str) -> float:
        if name not in self.METRICS:
            raise KeyError(f"{name!r}: evaluate reports {', '.join(self.METRICS)}")
        return float(getattr(self, name))

    def champion_metric(self, name: str) -> float:
        return float(getattr(self, f"champion_{self.METRICS[self.METRICS.index(name)]}"))

    @property
    def moe_minus_dense_val_loss(self) -> float:
        """Held-out loss of the MoE minus its dense equivalent's: negative = the MoE won (NaN
        without a dense baseline)."""
        return self.val_loss - self.dense_val_loss

    def dense_verdict(self) -> str:
        """``MoE won by 0.0421`` / ``MoE lost by 0.4650`` against its dense equivalent; "" without
        one."""
        gap = self.moe_minus_dense_val_loss
        if not math.isfinite(gap):
            return ""
        return f"MoE {'won' if gap < 0 else 'lost'} by {abs(gap):.4f}"

    def headline(self) -> str:
        text = f"val_loss={_num(self.val_loss)}"
        if math.isfinite(self.dense_val_loss):
            text += f" (dense {_num(self.dense_val_loss)}: {self.dense_verdict()})"
        if self.champion_version:
            text += f" (champion v{self.champion_version} {_num(self.champion_val_loss)})"
        return text


@dataclass(frozen=True)
class RegisterOutputs(StageOutputs):
    stage: ClassVar[str] = "register"

    model_name: str
    model_version: str
    model_id: str  # the train run's LoggedModel this version was created from
    aliases: list[str]
    promoted: bool
    reason: str
    previous_champion: str  # "" when there was none

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"

    def cache_digest(self) -> str:
        return digest_of({"model": self.model_uri, "aliases": sorted(self.aliases)})

    def headline(self) -> str:
        verdict = "promoted" if self.promoted else "not promoted"
        return f"{self.model_name} v{self.model_version} {verdict}"

    def why(self) -> str:
        """The gate's reason without its verdict word (the headline has that)."""
        return self.reason.split(": ", 1)[-1]


@dataclass(frozen=True)
class DeployOutputs(StageOutputs):
    stage: ClassVar[str] = "deploy"

    endpoint: str
    model_uri: str  # what the app serves (models:/<name>@<alias>)
    model_version: str  # the version it resolved to when deployed
    serve_config_path: str

    def headline(self) -> str:
        return f"{self.endpoint} (v{self.model_version})"
