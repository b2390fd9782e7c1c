"""MLflow models and registry: log an export as a LoggedModel, register versions, gate the champion.

The model artifact is the export directory written by ``components.model.export.save_export``
(safetensors weights + JSON model config + tokenizer.json).  It is logged once, by the run that
trained it (:func:`log_model`), as an MLflow pyfunc LoggedModel whose *artifacts* are that
directory, so no torch module is ever pickled. A registry version is created from that
LoggedModel (:func:`register_logged_model`), so MLflow shows run -> model -> version; loading a
version (:func:`load_registered`) downloads the directory and calls ``load_export`` on it.

Aliases, not stages: every new version gets ``challenger``; ``champion`` moves only when
:func:`decide_promotion` says the new version beats the current champion.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.pyfunc import PythonModel

from components.config.schema import RegistryConfig

# Key of the export directory in the pyfunc's ``artifacts`` (lands in <model>/artifacts/export).
EXPORT_ARTIFACT_KEY = "export"
MODEL_NAME_IN_RUN = "model"
MODEL_TYPE = "moe-transformer"
# Version tags; the promotion decision is recorded under these.
TAG_DECISION = "moeops.promotion"
TAG_REASON = "moeops.promotion_reason"
TAG_METRIC_PREFIX = "moeops.metric."

_MODEL_URI = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))$"
)
_REQUIREMENT_PACKAGES = ("torch", "mlflow", "safetensors", "tokenizers")


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, as the serving side needs it (also indexable like a dict)."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        data["model_uri"] = self.model_uri
        return data


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@champion`` -> (name, None,
    "champion")."""
    match = _MODEL_URI.match(model_uri.strip())
    if not match:
        raise ValueError(
            f"model_uri={model_uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>"
        )
    return match["name"], match["version"], match["alias"]


def _version_info(mv) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        aliases=tuple(mv.aliases or ()),
        run_id=mv.run_id or "",
        tags=dict(mv.tags or {}),
        source=mv.source or "",
    )


def get_version(model_uri: str, tracking_uri: str) -> VersionInfo:
    """Resolve a ``models:/`` URI to its version (raises a clear error if it does not exist)."""
    name, version, alias = parse_model_uri(model_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        mv = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, alias)
        )
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(
            f"{model_uri}: no such registered model version in {tracking_uri} ({exc.message})"
        ) from exc
    return _version_info(mv)


def find_version(model_uri: str, tracking_uri: str) -> VersionInfo | None:
    """Like :func:`get_version` but ``None`` when the model or alias does not exist (no champion
    yet)."""
    try:
        return get_version(model_uri, tracking_uri)
    except LookupError:
        return None


def download_export(
    model_uri: str, tracking_uri: str, dst_dir: str | Path | None = None
) -> tuple[Path, VersionInfo]:
    """Download a registered version's export directory; returns (local export dir, version)."""
    info = get_version(model_uri, tracking_uri)
    dst = (
        Path(dst_dir)
        if dst_dir
        else Path(tempfile.mkdtemp(prefix=f"moeops-{info.name}-v{info.version}-"))
    )
    return download_logged_export(info.model_uri, tracking_uri, dst), info


def download_logged_export(model_uri: str, tracking_uri: str, dst_dir: str | Path) -> Path:
    """The export directory of a logged model (``models:/<model_id>``) or registered version,
    downloaded."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri,
        dst_path=str(dst),
        tracking_uri=tracking_uri,
        registry_uri=tracking_uri,
    )
    export_dir = _export_dir_of(Path(local))
    if export_dir is None:
        raise FileNotFoundError(
            f"{model_uri}: the logged model has no artifacts/{EXPORT_ARTIFACT_KEY} directory; "
            "was it logged with components.tracking.registry.log_model?"
        )
    return export_dir


def _export_dir_of(model_dir: Path) -> Path | None:
    """The export inside a downloaded pyfunc model dir (MLmodel records where its artifact
    landed)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    entry = (flavor.get("artifacts") or {}).get(EXPORT_ARTIFACT_KEY)
    if not entry:
        return None
    path = model_dir / entry["path"]
    return path if path.is_dir() else None


def load_registered(
    model_uri: str, tracking_uri: str, device: str = "cpu", dst_dir: str | Path | None = None
):
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (LoadedModel, VersionInfo)."""
    from components.model.export import load_export

    export_dir, info = download_export(model_uri, tracking_uri, dst_dir)
    return load_export(export_dir, device), info


# --------------------------------------------------------------------------- the gate


def decide_promotion(
    candidate: float | None,
    champion: float | None,
    *,
    mode: str,
    min_improvement: float,
    metric: str,
    dense_gate: tuple[float, float] | None = None,
) -> tuple[bool, str]:
    """Should the candidate replace the champion? Pure; returns (promote, human-readable reason).

    The candidate must be strictly better and by at least ``min_improvement`` (absolute units).
    With no comparable champion, ``dense_gate`` = (candidate val_loss, its dense equivalent's
    val_loss) makes the first champion earn its place: promoted only when strictly below the
    dense baseline (a NaN baseline, i.e. none measured, refuses). ``None``: promoted outright.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: must be 'min' or 'max'")
    if candidate is None or not math.isfinite(candidate):
        return False, f"refused: candidate {metric}={candidate!r} is missing or not finite"
    if champion is None or not math.isfinite(champion):
        first = (
            f"no comparable champion (champion {metric}={champion!r}); "
            f"candidate {metric}={candidate:.6g}"
        )
        if dense_gate is None:
            return True, f"promoted: {first}; the dense-baseline gate is off"
        moe_loss, dense_loss = dense_gate
        if not math.isfinite(dense_loss):
            return False, (
                f"refused: {first}, and no dense baseline to beat (dense val_loss={dense_loss!r}; "
                "enable evaluate.compare_dense or set registry.require_dense_win=false)"
            )
        margin = dense_loss - moe_loss
        verdict = (
            f"{first}; MoE val_loss={moe_loss:.6g} vs its dense equivalent's {dense_loss:.6g}: "
            f"{'better' if margin > 0 else 'not better'} by {margin:.4g}"
        )
        return margin > 0, ("promoted: " if margin > 0 else "refused: ") + verdict
    improvement = champion - candidate if mode == "min" else candidate - champion
    verdict = (
        f"candidate {metric}={candidate:.6g} vs champion {metric}={champion:.6g} "
        f"({'lower' if mode == 'min' else 'higher'} is better): improvement {improvement:.6g}, "
        f"required > 0 and >= {min_improvement:.6g}"
    )
    promote = improvement > 0 and improvement >= min_improvement
    return promote, ("promoted: " if promote else "refused: ") + verdict


# --------------------------------------------------------------------------- logging


class MoeopsTextModel(PythonModel):
    """Pyfunc wrapper: prompts in, completions out. Holds no state when pickled; loads the
    export."""

    def load_context(self, context) -> None:
        from components.model.export import load_export

        self._loaded = load_export(context.artifacts[EXPORT_ARTIFACT_KEY], "cpu")

    # The hint tells MLflow the input is a DataFrame it cannot infer a schema from: the explicit
    # signature logged with the model (a `prompt` column) is the one it validates against.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from components.model.generate import generate_text

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            prompts = [str(p) for p in model_input["prompt"]]
        elif isinstance(model_input, dict):
            prompts = [
                str(p)
                for p in (
                    model_input["prompt"]
                    if isinstance(model_input["prompt"], list)
                    else [model_input["prompt"]]
                )
            ]
        else:
            prompts = [str(p) for p in model_input]
        loaded = self._loaded
        completions = generate_text(
            loaded.model,
            loaded.tokenizer,
            prompts,
            max_new_tokens=int(params.get("max_new_tokens", 16)),
            temperature=float(params.get("temperature", 0.0)),
        )
        return pd.DataFrame({"completion": completions})


def pinned_requirements() -> list[str]:
    """Exact installed versions of what loading the model needs (local build suffixes dropped)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in _REQUIREMENT_PACKAGES]


def _signature_and_example():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "completion")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", 16), ParamSpec("temperature", "double", 0.0)]
        ),
    )
    return signature, pd.DataFrame({"prompt": ["def main("]})


@dataclass
class Registration:
    """What :func:`register_logged_model` did."""

    model_name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    model_id: str  # the LoggedModel the version was created from (models:/<model_id>)
    aliases: list[str]
    promoted: bool
    reason: str
    previous_champion: str | None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def log_model(
    export_dir: str | Path,
    *,
    run_id: str,
    tracking_uri: str,
    params: dict[str, Any] | None = None,
    step: int = 0,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the export as a LoggedModel (a pyfunc) of run ``run_id``; returns its ``model_id``.

    The model's params are ``params`` plus the run's params (MLflow adds those), ``step`` links it
    to the run's metrics at that step. The stage runner makes a stage's run the active fluent run,
    so inside a stage this logs to it directly; elsewhere (scripts, tests) the run is activated for
    the call and ended afterwards.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(
            f"export_dir={export_dir}: not a directory (expected save_export output)"
        )
    signature, example = _signature_and_example()
    code_dir = (
        Path(__file__).resolve().parents[1]
    )  # the `components` package, so the pyfunc imports anywhere
    mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.active_run()
    owns_run = active is None or active.info.run_id != run_id
    if owns_run:
        mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        with tempfile.TemporaryDirectory(prefix="moeops-log-") as staging:
            # MLflow names the artifact after the directory: staging it as "export" gives every
            # model the same layout (<model>/artifacts/export/...). Hard links avoid a second copy
            # of the weights where the filesystem allows (MLflow refuses symlinks).
            linked = Path(staging) / EXPORT_ARTIFACT_KEY
            shutil.copytree(export_dir, linked, copy_function=_link_or_copy)
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=MoeopsTextModel(),
                artifacts={EXPORT_ARTIFACT_KEY: str(linked)},
                code_paths=[str(code_dir)],
                signature=signature,
                input_example=example,
                pip_requirements=pinned_requirements(),
                params={str(k): mlflow_param(v) for k, v in (params or {}).items()},
                tags=tags,
                model_type=MODEL_TYPE,
                step=int(step),
            )
    finally:
        if owns_run:
            mlflow.end_run()
    return info.model_id


def mlflow_param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def register_logged_model(
    model_id: str,
    *,
    tracking_uri: str,
    registry: RegistryConfig,
    metrics: dict[str, float],
    tags: dict[str, str],
    champion_metric: float | None = None,
    dense_gate: tuple[float, float] | None = None,
) -> Registration:
    """A new version of ``registry.model_name`` from the LoggedModel ``models:/<model_id>``, tagged
    with
    ``tags`` and ``moeops.metric.*``; ``registry.challenger_alias`` set, ``registry.champion_alias``
    gated.

    ``champion_metric``: the current champion's ``registry.metric`` measured on the same held-out
    data (the evaluate stage's); when ``None`` the champion version's ``moeops.metric.<metric>`` tag
    is used. ``dense_gate``: (val_loss, dense baseline val_loss) for the no-champion case (see
    :func:`decide_promotion`).
    """
    metric, name = registry.metric, registry.model_name
    if metric not in metrics:
        raise KeyError(
            f"registry.metric={metric!r} is not among the candidate's metrics {sorted(metrics)}"
        )
    champion = find_version(f"models:/{name}@{registry.champion_alias}", tracking_uri)
    if champion is not None and champion_metric is None:
        tagged = champion.tags.get(TAG_METRIC_PREFIX + metric)
        champion_metric = float(tagged) if tagged is not None else None
    promote, reason = decide_promotion(
        metrics[metric],
        champion_metric,
        mode=registry.mode,
        min_improvement=registry.min_improvement,
        metric=metric,
        dense_gate=dense_gate,
    )

    version_tags = {str(k): str(v) for k, v in tags.items()}
    version_tags.update({TAG_METRIC_PREFIX + k: f"{float(v):.8g}" for k, v in metrics.items()})
    version_tags[TAG_DECISION] = "promoted" if promote else "refused"
    version_tags[TAG_REASON] = reason
    # mlflow.register_model links the version to the LoggedModel (its page lists the version);
    # it uses the process' tracking URI, which is this store's.
    mlflow.set_tracking_uri(tracking_uri)
    version = str(mlflow.register_model(f"models:/{model_id}", name, tags=version_tags).version)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(name, registry.challenger_alias, version)
    if promote:
        client.set_registered_model_alias(name, registry.champion_alias, version)
    aliases = sorted(client.get_model_version(name, version).aliases or [])
    return Registration(
        model_name=name,
        version=version,
        model_uri=f"models:/{name}/{version}",
        model_id=model_id,
        aliases=aliases,
        promoted=promote,
        reason=reason,
        previous_champion=champion.version if champion else None,
    )


def log_and_register(
    export_dir: str | Path,
    *,
    run_id: str,
    tracking_uri: str,
    registry: RegistryConfig,
    metrics: dict[str, float],
    tags: dict[str, str],
    champion_metric: float | None = None,
    params: dict[str, Any] | None = None,
    step: int = 0,
) -> Registration:
    """:func:`log_model` then :func:`register_logged_model` (demos, tests: one run does both).

    The pipeline splits them: the train stage logs the model, the register stage registers it.
    """
    model_id = log_model(
        export_dir, run_id=run_id, tracking_uri=tracking_uri, params=params, step=step, tags=tags
    )
    registration = register_logged_model(
        model_id,
        tracking_uri=tracking_uri,
        registry=registry,
        metrics=metrics,
        tags=tags,
        champion_metric=champion_metric,
    )
    record_decision(MlflowClient(tracking_uri), run_id, registration)
    return registration


def record_decision(client: MlflowClient, run_id: str, registration: Registration) -> None:
    """The gate's decision as tags and a ``promoted`` metric of the run that registered."""
    client.set_tag(run_id, TAG_DECISION, "promoted" if registration.promoted else "refused")
    client.set_tag(run_id, TAG_REASON, registration.reason)
    client.log_metric(run_id, "promoted", 1.0 if registration.promoted else 0.0)


def registration_json(reg: Registration) -> str:
    return json.dumps(asdict(reg), indent=2, sort_keys=True)
