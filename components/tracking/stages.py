"""The stage runner: one nested MLflow run per stage, code-aware step caching, timing and lineage.

A stage is a function ``StageContext -> outputs`` (a :class:`StageOutputs` dataclass) plus
what it depends on. The runner owns everything around it: finding upstream outputs (in this
invocation, an explicit run id, or the latest finished run), the cache key, reusing a finished
run with the same key, saying why a stage ran again, the nested run's params/tags/status/
duration, and recording the outputs so the next stage (or a later invocation) reads them typed.

The cache key of a stage is the digest of

- its config slice (``StageSpec.config_keys``),
- the cache digests of the upstream outputs it reads (``StageOutputs.cache_digest``),
- the code it runs: every project module its pipeline module imports, transitively
  (:mod:`components.tracking.code`),
- the schema of its outputs.

Each part is also recorded on the run (``moeops.key.*`` tags), so a rerun can be explained:
"config changed (train.lr)", "input changed (prepare)", "code changed (components.model.router)".
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from components.config import Config, flatten, to_container
from components.tracking import mlflow_utils
from components.tracking.code import PROJECT_ROOT, changed_modules, code_closure
from components.tracking.outputs import OutputsError, StageOutputs, digest_of
from components.tracking.progress import Progress

__all__ = [
    "StageSpec",
    "StageContext",
    "StageOutcome",
    "StageInputError",
    "run_stage",
    "resolve_upstream",
    "cache_key",
    "code_digest",
    "outputs_of_run",
    "digest_of",
]

OUT_PREFIX = "moeops.out."
STAGE_TAG = "moeops.stage"
CACHE_TAG = "moeops.cache_key"
SCHEMA_TAG = "moeops.outputs_schema"
REASON_TAG = "moeops.rerun_reason"
KEY_CONFIG_TAG = "moeops.key.config"
KEY_INPUTS_TAG = "moeops.key.inputs"
KEY_CODE_TAG = "moeops.key.code"
KEY_MODULES_TAG = "moeops.key.code_modules"
OUTPUTS_FILE = "outputs.json"

OutputsT = TypeVar("OutputsT", bound=StageOutputs)
OutputsType = type[StageOutputs]


class StageInputError(RuntimeError):
    """An upstream stage's outputs cannot be found; says how to provide them."""


@dataclass
class StageSpec:
    name: str
    # config sections (or dotted keys) whose values change this stage's outputs
    config_keys: tuple[str, ...]
    # the outputs this stage reads (their classes name the upstream stages); a callable picks them
    # from the config (train reads tune's only when the sweep is on)
    upstream: tuple[OutputsType, ...] | Callable[[Config], tuple[OutputsType, ...]]
    fn: Callable[[StageContext], StageOutputs]
    outputs: OutputsType
    # a cached run is reused only while this still holds (e.g. its files or endpoint exist)
    still_valid: Callable[[Config, Any], bool] | None = None
    # the module whose import closure is this stage's code (default: where ``fn`` is defined,
    # by its importable name also when it runs as ``python -m pipelines.<stage>``)
    module: str = ""
    # MLflow system metrics (CPU, memory, GPU, network) on this stage's run while it works
    system_metrics: bool = False

    def __post_init__(self) -> None:
        self.module = self.module or importable_name(self.fn.__module__)
        if self.outputs.stage != self.name:
            raise ValueError(
                f"stage {self.name!r}: its outputs class {self.outputs.__name__} is "
                f"declared for stage {self.outputs.stage!r}"
            )

    def upstream_for(self, config: Config) -> tuple[OutputsType, ...]:
        return self.upstream(config) if callable(self.upstream) else self.upstream


def importable_name(module: str) -> str:
    """The name ``module`` is imported by; for ``__main__`` (a stage run as ``python -m
    pipelines.train``) the name it was started under, so its code key is the one it has inside
    ``pipelines.run`` (``code_closure(["__main__"])`` finds no file: an empty key)."""
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m pkg.mod
        return spec.name
    path = Path(getattr(main, "__file__", "") or "").resolve()
    if path.is_file() and path.is_relative_to(PROJECT_ROOT):  # python pipelines/train.py
        return ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    raise ValueError(
        "a stage defined in __main__ needs StageSpec(module=...): its code cannot be found"
    )


def code_digest(spec: StageSpec) -> str:
    """The digest of the stage's code (its module's import closure): the cache key's code part."""
    return digest_of(code_closure([spec.module]))


@dataclass
class StageOutcome:
    name: str
    run_id: str
    outputs: StageOutputs
    reused: bool
    duration_s: float
    reused_from: str = ""
    reason: str = ""  # why the stage ran (empty when reused)


@dataclass
class StageContext:
    name: str
    config: Config
    config_dict: dict[str, Any]
    run_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    client: MlflowClient
    # upstream stage name -> its outputs
    inputs: dict[str, StageOutputs]
    work_dir: Path
    input_run_ids: dict[str, str] = field(default_factory=dict)
    # digest of the stage's code (the cache key's code part): names checkpoints and sweeps, so a
    # code change never resumes what older code produced
    code_digest: str = ""

    def input(self, kind: type[OutputsT]) -> OutputsT:
        """The outputs of the upstream stage that produces ``kind``, typed."""
        outputs = self.inputs.get(kind.stage)
        if outputs is None:
            raise StageInputError(
                f"stage '{self.name}' did not declare '{kind.stage}' as an upstream stage"
            )
        if not isinstance(outputs, kind):
            raise TypeError(
                f"inputs['{kind.stage}'] is a {type(outputs).__name__}, not a {kind.__name__}"
            )
        return outputs

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow_utils.log_metrics(self.client, self.run_id, metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow_utils.log_params(self.client, self.run_id, flatten(params))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow_utils.set_tags(self.client, self.run_id, tags)

    def progress(self, total: int, unit: str = "step") -> Progress:
        return Progress(self.name, total, unit)


# --------------------------------------------------------------------------- cache key


def select_config(config_dict: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    selected: dict[str, Any] = {}
    for key in keys:
        node: Any = config_dict
        for part in key.split("."):
            node = node[part]
        selected[key] = node
    return selected


@dataclass(frozen=True)
class CacheKey:
    """The parts of a stage's cache key; ``value`` is what runs are matched on."""

    stage: str
    config: dict[str, Any]  # the config slice
    inputs: dict[str, str]  # upstream stage -> cache digest of its outputs
    code: dict[str, str]  # module -> digest of its syntax tree
    outputs_schema: str

    @property
    def config_digest(self) -> str:
        return digest_of(self.config)

    @property
    def code_digest(self) -> str:
        return digest_of(self.code)

    @property
    def value(self) -> str:
        return digest_of(
            {
                "stage": self.stage,
                "config": self.config_digest,
                "inputs": self.inputs,
                "code": self.code_digest,
                "outputs": self.outputs_schema,
            }
        )

    def tags(self) -> dict[str, str]:
        return {
            CACHE_TAG: self.value,
            KEY_CONFIG_TAG: self.config_digest,
            KEY_INPUTS_TAG: json.dumps(self.inputs, sort_keys=True),
            KEY_CODE_TAG: self.code_digest,
            # short digests: enough to name what changed, small enough for a tag
            KEY_MODULES_TAG: json.dumps({m: d[:12] for m, d in self.code.items()}, sort_keys=True),
            SCHEMA_TAG: self.outputs_schema,
        }


def cache_key(
    spec: StageSpec, config_dict: dict[str, Any], upstream: dict[str, StageOutputs]
) -> CacheKey:
    """Same code, relevant config and upstream outputs -> same key."""
    return CacheKey(
        stage=spec.name,
        config=select_config(config_dict, spec.config_keys),
        inputs={name: outputs.cache_digest() for name, outputs in sorted(upstream.items())},
        code=code_closure([spec.module]),
        outputs_schema=spec.outputs.schema_digest(),
    )


def rerun_reason(
    spec: StageSpec, key: CacheKey, previous, *, forced: bool, invalid_run: str = ""
) -> str:
    """Why the stage runs instead of reusing ``previous`` (its latest finished run, if any)."""
    if forced:
        return "forced (force=true)"
    if invalid_run:
        return f"cached run {invalid_run[:8]} no longer valid"
    if previous is None:
        return "no earlier run"
    tags, reasons = previous.data.tags, []
    if tags.get(KEY_CONFIG_TAG, key.config_digest) != key.config_digest:
        before = previous.data.params
        changed = [
            k
            for k, v in flatten(key.config).items()
            if k in before and before[k] != mlflow_utils.param_value(v)
        ]
        reasons.append(f"config changed ({_names(changed) or ', '.join(key.config)})")
    before_inputs = json.loads(tags.get(KEY_INPUTS_TAG, "{}"))
    changed_inputs = sorted(
        n for n in set(before_inputs) | set(key.inputs) if before_inputs.get(n) != key.inputs.get(n)
    )
    if changed_inputs and KEY_INPUTS_TAG in tags:
        reasons.append(f"input changed ({', '.join(changed_inputs)})")
    if tags.get(KEY_CODE_TAG, key.code_digest) != key.code_digest:
        before_code = json.loads(tags.get(KEY_MODULES_TAG, "{}"))
        reasons.append(
            f"code changed ({_names(changed_modules(before_code, key.code)) or 'modules'})"
        )
    if not reasons:
        if tags.get(SCHEMA_TAG, key.outputs_schema) != key.outputs_schema:
            return "outputs schema changed"
        return "earlier run has no comparable cache key"
    return "; ".join(reasons)


def _names(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" +{len(items) - shown} more" if len(items) > shown else "")


# --------------------------------------------------------------------------- outputs on runs


def record_outputs(client: MlflowClient, run_id: str, outputs: StageOutputs) -> None:
    mlflow_utils.set_tags(client, run_id, {OUT_PREFIX + k: v for k, v in outputs.tags().items()})
    client.log_dict(run_id, outputs.to_json(), OUTPUTS_FILE)


def outputs_of_run(client: MlflowClient, run_id: str, kind: type[OutputsT]) -> OutputsT:
    """The typed outputs a finished stage run recorded."""
    try:
        with tempfile.TemporaryDirectory(prefix="moeops-outputs-") as tmp:
            data = json.loads(
                Path(client.download_artifacts(run_id, OUTPUTS_FILE, tmp)).read_text()
            )
    except Exception as err:
        raise StageInputError(f"run {run_id}: cannot read its {OUTPUTS_FILE} ({err})") from None
    try:
        return kind.from_json(data)
    except OutputsError as err:
        raise StageInputError(f"run {run_id}: {err}; rerun stage '{kind.stage}'") from None


def parse_run_ref(ref: str) -> str:
    """``<run_id>`` or ``runs:/<run_id>[/path]`` -> run id."""
    if ref.startswith("runs:/"):
        return ref[len("runs:/") :].strip("/").split("/")[0]
    return ref.strip()


def latest_finished_run(
    client: MlflowClient,
    experiment_id: str,
    stage: str,
    *,
    cache: str | None = None,
    schema: str | None = None,
):
    query = f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'"
    if cache:
        query += f" and tags.`{CACHE_TAG}` = '{cache}'"
    if schema:
        query += f" and tags.`{SCHEMA_TAG}` = '{schema}'"
    runs = client.search_runs(
        [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def resolve_upstream(
    client: MlflowClient,
    experiment_id: str,
    spec: StageSpec,
    config: Config,
    produced: dict[str, StageOutcome],
) -> tuple[dict[str, StageOutputs], dict[str, str]]:
    """Upstream outputs: from this invocation, ``inputs.<stage>=<run>``, or the latest finished
    run."""
    inputs: dict[str, StageOutputs] = {}
    run_ids: dict[str, str] = {}
    for kind in spec.upstream_for(config):
        name = kind.stage
        if name in produced:
            inputs[name], run_ids[name] = produced[name].outputs, produced[name].run_id
            continue
        ref = config.inputs.get(name)
        if ref:
            run_id = parse_run_ref(ref)
            try:
                run = client.get_run(run_id)
            except Exception as err:
                raise StageInputError(
                    f"inputs.{name}={ref!r}: no such MLflow run ({err})"
                ) from None
            if run.data.tags.get(STAGE_TAG) != name or run.info.status != "FINISHED":
                raise StageInputError(
                    f"inputs.{name}={ref!r}: run {run_id} is not a finished '{name}' stage run "
                    f"(stage={run.data.tags.get(STAGE_TAG)!r}, status={run.info.status})"
                )
        else:
            run = latest_finished_run(client, experiment_id, name, schema=kind.schema_digest())
            if run is None:
                raise StageInputError(
                    f"stage '{spec.name}' needs the outputs of stage '{name}', and the experiment "
                    "has no "
                    f"finished '{name}' run with this version's outputs: run `python -m "
                    f"pipelines.{name}` "
                    f"first, run the whole pipeline with `python -m pipelines.run`, or pass "
                    f"+inputs.{name}=<run id>"
                )
        inputs[name] = outputs_of_run(client, run.info.run_id, kind)
        run_ids[name] = run.info.run_id
    return inputs, run_ids


# --------------------------------------------------------------------------- running


def _start_nested_run(client, experiment_id, parent_run_id, name, tags) -> str:
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, STAGE_TAG: name, **tags},
    )
    return run.info.run_id


def final_status(error: BaseException | None) -> str:
    """FINISHED; KILLED when stopped by a signal (Ctrl-C, SIGTERM, Ray's exit on SIGTERM); else
    FAILED."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


def run_stage(
    spec: StageSpec,
    config: Config,
    *,
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    produced: dict[str, StageOutcome],
    base_tags: dict[str, str],
) -> StageOutcome:
    config_dict = to_container(config)
    inputs, input_run_ids = resolve_upstream(client, experiment_id, spec, config, produced)
    key = cache_key(spec, config_dict, inputs)
    lineage_tags = {f"moeops.in.{name}": run_id for name, run_id in input_run_ids.items()}
    config_params = flatten(select_config(config_dict, spec.config_keys))
    started = time.monotonic()

    invalid_run = ""
    cached = (
        None
        if config.force
        else latest_finished_run(client, experiment_id, spec.name, cache=key.value)
    )
    if cached is not None:
        outputs = outputs_of_run(client, cached.info.run_id, spec.outputs)
        if spec.still_valid is None or spec.still_valid(config, outputs):
            source = cached.data.tags.get("moeops.reused_from") or cached.info.run_id
            run_id = _start_nested_run(
                client,
                experiment_id,
                parent_run_id,
                spec.name,
                {
                    **base_tags,
                    **lineage_tags,
                    **key.tags(),
                    "moeops.reused": "true",
                    "moeops.reused_from": source,
                },
            )
            mlflow_utils.log_params(client, run_id, config_params)
            record_outputs(client, run_id, outputs)
            duration = time.monotonic() - started
            mlflow_utils.set_tags(client, run_id, {"moeops.duration_s": f"{duration:.2f}"})
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
            print(
                f"[{spec.name}] reused run {source} (same code, inputs and config; force=true "
                "reruns)",
                flush=True,
            )
            return StageOutcome(spec.name, run_id, outputs, True, duration, source)
        invalid_run = cached.info.run_id

    previous = (
        None
        if config.force or invalid_run
        else latest_finished_run(client, experiment_id, spec.name)
    )
    reason = rerun_reason(spec, key, previous, forced=config.force, invalid_run=invalid_run)
    run_id = _start_nested_run(
        client,
        experiment_id,
        parent_run_id,
        spec.name,
        {**base_tags, **lineage_tags, **key.tags(), "moeops.reused": "false", REASON_TAG: reason},
    )
    mlflow_utils.log_params(client, run_id, config_params)
    work_dir = Path(config.paths.root) / "stages" / spec.name / run_id
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name=spec.name,
        config=config,
        config_dict=config_dict,
        run_id=run_id,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        tracking_uri=config.tracking.uri,
        client=client,
        inputs=inputs,
        work_dir=work_dir,
        input_run_ids=input_run_ids,
        code_digest=key.code_digest,
    )
    print(f"[{spec.name}] started (MLflow run {run_id}): {reason}", flush=True)
    # The stage's run is the active fluent run while it works, so MLflow's own APIs (log_model,
    # log_input, system metrics) attach to it.
    # System metrics: always for the stages that ask; for the others as MLflow's own setting says
    # (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING).
    mlflow.start_run(
        run_id=run_id,
        nested=mlflow.active_run() is not None,
        log_system_metrics=True if spec.system_metrics else None,
    )
    error: BaseException | None = None
    try:
        outputs = spec.fn(ctx)
        if not isinstance(outputs, spec.outputs):
            raise TypeError(
                f"stage '{spec.name}' returned {type(outputs).__name__}, "
                f"not its declared {spec.outputs.__name__}"
            )
        record_outputs(client, run_id, outputs)
    except BaseException as err:
        error = err
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            client.log_text(run_id, traceback.format_exc(), "error.txt")
        raise
    finally:
        duration = time.monotonic() - started
        mlflow_utils.set_tags(client, run_id, {"moeops.duration_s": f"{duration:.2f}"})
        mlflow_utils.log_metrics(client, run_id, {"stage_duration_s": duration})
        mlflow.end_run(final_status(error))
    print(f"[{spec.name}] finished in {duration:.1f}s", flush=True)
    return StageOutcome(spec.name, run_id, outputs, False, duration, reason=reason)
