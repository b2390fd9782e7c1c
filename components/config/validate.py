"""Cross-field rules of the config, checked once on the driver before any Ray or MLflow work."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from components.config.schema import Config

STAGES = ("prepare", "tune", "train", "evaluate", "register", "deploy")
SEARCH_TYPES = ("loguniform", "uniform", "choice", "randint", "quniform")
# held-out figures the evaluate stage measures for every model it compares (the gate's metric)
REGISTRY_METRICS = ("val_loss", "perplexity", "generation_tokens_per_s")


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending key, its value and what is
    allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _one_of(problems: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def _get_dotted(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            raise KeyError(dotted)
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every broken rule (not just the first)."""
    p: list[str] = []
    m, t, d, s = cfg.model, cfg.train, cfg.data, cfg.serve

    _one_of(p, "model.kind", m.kind, ("moe", "dense"))
    _one_of(p, "model.expert_backend", m.expert_backend, ("auto", "grouped_mm", "loop"))
    if m.dim % m.n_heads:
        p.append(f"model.dim={m.dim}: must be divisible by model.n_heads ({m.n_heads})")
    elif (m.dim // m.n_heads) % 2:
        p.append(
            f"model.dim={m.dim}: head size dim/n_heads={m.dim // m.n_heads} must be even for rotary embeddings"
        )
    for key in ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "num_experts"):
        if getattr(m, key) < 1:
            p.append(f"model.{key}={getattr(m, key)}: must be >= 1")
    if m.kind == "moe":
        if not 1 <= m.top_k <= m.num_experts:
            p.append(
                f"model.top_k={m.top_k}: must be between 1 and model.num_experts ({m.num_experts})"
            )
        if m.capacity_factor <= 0 and not m.dropless:
            p.append(
                f"model.capacity_factor={m.capacity_factor}: must be > 0 (or set model.dropless=true)"
            )
        if m.moe_layer_interval < 1:
            p.append(f"model.moe_layer_interval={m.moe_layer_interval}: must be >= 1")
        elif m.moe_layer_interval > m.n_layers:
            p.append(
                f"model.moe_layer_interval={m.moe_layer_interval}: exceeds model.n_layers ({m.n_layers}), "
                "so no layer would be MoE (use model.kind=dense for that)"
            )
        if m.routed_scaling_factor <= 0:
            p.append(f"model.routed_scaling_factor={m.routed_scaling_factor}: must be > 0")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(m, key) < 0:
                p.append(f"model.{key}={getattr(m, key)}: must be >= 0")
        if m.num_experts % t.expert_parallel_size:
            p.append(
                f"model.num_experts={m.num_experts}: must be divisible by "
                f"train.expert_parallel_size ({t.expert_parallel_size})"
            )

    if t.expert_parallel_size < 1:
        p.append(f"train.expert_parallel_size={t.expert_parallel_size}: must be >= 1")
    elif t.num_workers % t.expert_parallel_size:
        p.append(
            f"train.num_workers={t.num_workers}: must be a multiple of "
            f"train.expert_parallel_size ({t.expert_parallel_size})"
        )
    if t.num_workers < 1:
        p.append(f"train.num_workers={t.num_workers}: must be >= 1")
    _one_of(p, "train.precision", t.precision, ("fp32", "bf16", "fp16"))
    _one_of(p, "train.backend", t.backend, ("auto", "gloo", "nccl"))
    if t.precision in ("bf16", "fp16") and not t.use_gpu:
        p.append(
            f"train.precision={t.precision!r}: mixed precision needs train.use_gpu=true (CPU trains in fp32)"
        )
    if t.backend == "nccl" and not t.use_gpu:
        p.append("train.backend='nccl': needs train.use_gpu=true (use 'gloo' or 'auto' on CPU)")
    if t.use_gpu and t.gpus_per_worker <= 0:
        p.append(f"train.gpus_per_worker={t.gpus_per_worker}: must be > 0 when train.use_gpu=true")
    if t.use_gpu and t.backend in ("auto", "nccl") and t.gpus_per_worker % 1:
        # NCCL refuses two ranks on one device ("Duplicate GPU detected") at the first collective
        p.append(
            f"train.gpus_per_worker={t.gpus_per_worker}: NCCL needs whole GPUs per worker "
            "(1, 2, ...); fractional GPUs only with train.backend='gloo'"
        )
    _one_of(p, "train.data_parallel", t.data_parallel, ("ddp", "fsdp"))
    _one_of(
        p,
        "train.activation_checkpointing",
        t.activation_checkpointing,
        ("none", "selective", "full"),
    )
    if t.data_parallel == "fsdp" and t.precision == "fp16":
        p.append(
            "train.data_parallel='fsdp' with train.precision='fp16': not supported "
            "(FSDP2 runs bf16 or fp32; fp16's loss scaler is kept for the DDP path)"
        )
    for key in (
        "batch_size",
        "grad_accum_steps",
        "max_steps",
        "eval_every",
        "log_every",
        "checkpoint_every",
    ):
        if getattr(t, key) < 1:
            p.append(f"train.{key}={getattr(t, key)}: must be >= 1")
    if t.warmup_steps < 0 or t.warmup_steps >= t.max_steps:
        p.append(
            f"train.warmup_steps={t.warmup_steps}: must be >= 0 and < train.max_steps ({t.max_steps})"
        )
    if not 0 < t.lr < 1:
        p.append(f"train.lr={t.lr}: must be in (0, 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
    if not 0 <= t.stop_at_step <= t.max_steps:
        p.append(
            f"train.stop_at_step={t.stop_at_step}: must be between 0 (off) and train.max_steps ({t.max_steps})"
        )
    if not t.resume.strip():
        p.append("train.resume='': must be 'auto', 'never' or a checkpoint path/URI")
    if t.keep_checkpoints < 1:
        p.append(
            f"train.keep_checkpoints={t.keep_checkpoints}: must be >= 1 (resume needs the latest checkpoint)"
        )
    if t.max_failures < -1:
        p.append(f"train.max_failures={t.max_failures}: must be >= 0, or -1 for unlimited retries")
    if t.worker_start_timeout_s <= 0:
        p.append(
            f"train.worker_start_timeout_s={t.worker_start_timeout_s}: must be > 0 (seconds Ray Train waits for its workers to start)"
        )
    if t.overlap.a2a_chunks < 1:
        p.append(f"train.overlap.a2a_chunks={t.overlap.a2a_chunks}: must be >= 1")

    _one_of(p, "data.source", d.source, ("stdlib", "files"))
    if d.source == "files" and not d.uri:
        p.append(
            "data.uri='': data.source='files' needs an fsspec URI or glob of text/JSONL/Parquet files"
        )
    if d.seq_len < 8:
        p.append(f"data.seq_len={d.seq_len}: must be >= 8")
    if d.seq_len > m.max_seq_len:
        p.append(f"data.seq_len={d.seq_len}: must be <= model.max_seq_len ({m.max_seq_len})")
    if not 0 < d.val_fraction < 1:
        p.append(f"data.val_fraction={d.val_fraction}: must be in (0, 1)")
    if d.vocab_size < 300:
        p.append(f"data.vocab_size={d.vocab_size}: must be >= 300 (256 byte symbols plus merges)")
    if d.rows_per_shard < 0:
        p.append(
            f"data.rows_per_shard={d.rows_per_shard}: must be >= 1, or 0 to size shards by data.shard_mb"
        )
    if d.shard_mb < 1:
        p.append(f"data.shard_mb={d.shard_mb}: must be >= 1")

    st = cfg.storage
    if st.warm_limit_bytes <= 0:
        p.append(f"storage.warm_limit_bytes={st.warm_limit_bytes}: must be > 0")
    if st.retries < 0:
        p.append(f"storage.retries={st.retries}: must be >= 0")
    if st.parallel_fetches < 1:
        p.append(f"storage.parallel_fetches={st.parallel_fetches}: must be >= 1")
    if st.part_mb < 1:
        p.append(f"storage.part_mb={st.part_mb}: must be >= 1")
    if st.hot_prefetch_batches < 0:
        p.append(
            f"storage.hot_prefetch_batches={st.hot_prefetch_batches}: must be >= 0 (0 = no prefetch thread)"
        )
    if not 0 < st.backoff_base_s <= st.backoff_max_s:
        p.append(
            f"storage.backoff_base_s={st.backoff_base_s}: must be > 0 and <= storage.backoff_max_s ({st.backoff_max_s})"
        )
    if not st.cold_uri:
        p.append(
            "storage.cold_uri='': needs a local directory or an fsspec URI (s3://bucket/prefix, gs://...)"
        )
    if d.max_files < 1 or d.max_bytes < 1:
        p.append(f"data.max_files={d.max_files}, data.max_bytes={d.max_bytes}: must be >= 1")

    tu = cfg.tune
    # A sweep that is off is never run: its settings (e.g. trial_num_workers for another
    # train.expert_parallel_size) must not block the training that is.
    if tu.enabled:
        _one_of(p, "tune.mode", tu.mode, ("min", "max"))
        _one_of(p, "tune.search_alg", tu.search_alg, ("optuna", "random"))
        _one_of(p, "tune.scheduler", tu.scheduler, ("asha", "fifo"))
        if tu.num_samples < 1:
            p.append(f"tune.num_samples={tu.num_samples}: must be >= 1")
        if tu.trial_max_steps < 1 or tu.trial_eval_every < 1:
            p.append(
                f"tune.trial_max_steps={tu.trial_max_steps}, tune.trial_eval_every={tu.trial_eval_every}: must be >= 1"
            )
        if tu.trial_num_workers % t.expert_parallel_size:
            p.append(
                f"tune.trial_num_workers={tu.trial_num_workers}: must be a multiple of "
                f"train.expert_parallel_size ({t.expert_parallel_size})"
            )
        for key, spec in tu.search_space.items():
            try:
                _get_dotted(cfg, key)
            except KeyError:
                p.append(f"tune.search_space.{key}: no such config key")
                continue
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in SEARCH_TYPES:
                p.append(
                    f"tune.search_space.{key}.type={kind!r}: must be one of {', '.join(SEARCH_TYPES)}"
                )
            elif kind == "choice" and not spec.get("values"):
                p.append(
                    f"tune.search_space.{key}.values: a choice needs a non-empty list of values"
                )
            elif kind != "choice" and not (
                isinstance(spec.get("low"), (int, float))
                and isinstance(spec.get("high"), (int, float))
                and spec["low"] < spec["high"]
            ):
                p.append(
                    f"tune.search_space.{key}: {kind} needs numbers low < high, got low={spec.get('low')!r} high={spec.get('high')!r}"
                )
            elif kind == "loguniform" and spec["low"] <= 0:
                p.append(f"tune.search_space.{key}.low={spec['low']}: loguniform needs low > 0")

        for i, point in enumerate(tu.points_to_evaluate):
            for key in point:
                try:
                    _get_dotted(cfg, key)
                except KeyError:
                    p.append(f"tune.points_to_evaluate[{i}].{key}: no such config key")
        if tu.trial_driver_cpus < 0:
            p.append(f"tune.trial_driver_cpus={tu.trial_driver_cpus}: must be >= 0")

    _one_of(p, "registry.mode", cfg.registry.mode, ("min", "max"))
    _one_of(p, "registry.metric", cfg.registry.metric, REGISTRY_METRICS)
    if cfg.registry.champion_alias == cfg.registry.challenger_alias:
        p.append(
            f"registry.challenger_alias={cfg.registry.challenger_alias!r}: must differ from registry.champion_alias"
        )

    if s.max_tokens < 1:
        p.append(f"serve.max_tokens={s.max_tokens}: must be >= 1")
    if s.max_prompt_tokens + s.max_tokens > m.max_seq_len:
        p.append(
            f"serve.max_tokens={s.max_tokens}: serve.max_prompt_tokens ({s.max_prompt_tokens}) + serve.max_tokens "
            f"must fit in the context, model.max_seq_len ({m.max_seq_len})"
        )
    _one_of(p, "serve.engine", s.engine, ("moeops", "vllm"))
    if s.engine == "vllm":
        if s.num_gpus < 1 or s.num_gpus != int(s.num_gpus):
            p.append(
                f"serve.engine='vllm' needs GPU replicas: serve.num_gpus={s.num_gpus} must be a "
                "whole number >= 1 (each replica's vLLM engine, tensor-parallel over that many "
                "GPUs); vLLM does not run on CPU: use serve.engine=moeops there"
            )
        if s.quantize == "int8":
            p.append(
                "serve.quantize='int8' is moeops' own int8 path; with serve.engine='vllm' set "
                "serve.quantize=auto or none (vLLM serves the export's weights)"
            )
    if not 0 <= s.canary_fraction <= 1:
        p.append(f"serve.canary_fraction={s.canary_fraction}: must be in [0, 1]")
    _one_of(
        p, "serve.quantize", s.quantize, ("none", "int8", "auto")
    )  # components.model.quantize.QUANTIZE_MODES
    if s.quantize == "int8" and s.num_gpus > 0 and importlib.util.find_spec("torchao") is None:
        p.append(
            "serve.quantize='int8' on GPU replicas (serve.num_gpus > 0) uses torchao, which is not installed: "
            "pip install 'moeops[cuda-int8]', or set serve.quantize=auto or none"
        )
    if not 0 < s.port < 65536:
        p.append(f"serve.port={s.port}: must be a TCP port (1-65535)")
    for key in ("max_num_seqs", "max_prompts", "max_n", "max_queued_sequences", "retry_after_s"):
        if getattr(s, key) < 1:
            p.append(f"serve.{key}={getattr(s, key)}: must be >= 1")
    if s.max_num_batched_tokens < s.max_prompt_tokens:
        p.append(
            f"serve.max_num_batched_tokens={s.max_num_batched_tokens}: must be >= serve.max_prompt_tokens "
            f"({s.max_prompt_tokens}) or a long prompt could never be admitted"
        )
    if s.max_logprobs < 0:
        p.append(f"serve.max_logprobs={s.max_logprobs}: must be >= 0")
    if not 0 <= s.max_surge_percent <= 100:
        p.append(f"serve.max_surge_percent={s.max_surge_percent}: must be in [0, 100]")
    if s.num_cpus <= 0 and s.num_gpus <= 0:
        p.append(f"serve.num_cpus={s.num_cpus}: a replica needs some CPU or GPU")
    _one_of(p, "serve.proxy_location", s.proxy_location, ("HeadOnly", "EveryNode", "Disabled"))
    if s.max_ongoing_requests < s.max_num_seqs:
        p.append(
            f"serve.max_ongoing_requests={s.max_ongoing_requests}: must be >= serve.max_num_seqs "
            f"({s.max_num_seqs}) or the decoding slots can never fill"
        )
    if s.max_prompt_tokens < 1 or s.max_body_bytes < 256:
        p.append(
            f"serve.max_prompt_tokens={s.max_prompt_tokens}, serve.max_body_bytes={s.max_body_bytes}: "
            "must be >= 1 and >= 256"
        )
    if not s.route_prefix.startswith("/"):
        p.append(f"serve.route_prefix={s.route_prefix!r}: must start with '/'")
    if s.model_uri and not s.model_uri.startswith("models:/"):
        p.append(
            f"serve.model_uri={s.model_uri!r}: must be models:/<name>@<alias> or models:/<name>/<version>"
        )
    a = s.autoscaling
    if a.enabled and not 1 <= a.min_replicas <= a.max_replicas:
        p.append(
            f"serve.autoscaling.min_replicas={a.min_replicas}: need 1 <= min_replicas <= max_replicas "
            f"({a.max_replicas})"
        )
    if a.enabled and (
        a.upscale_delay_s < 0
        or a.downscale_delay_s < 0
        or a.look_back_period_s <= 0
        or a.target_ongoing_requests <= 0
        or a.metrics_interval_s <= 0
    ):
        p.append(
            f"serve.autoscaling: delays must be >= 0, look_back_period_s, target_ongoing_requests and "
            "metrics_interval_s > 0 "
            f"(got upscale_delay_s={a.upscale_delay_s}, downscale_delay_s={a.downscale_delay_s}, "
            f"look_back_period_s={a.look_back_period_s}, target_ongoing_requests={a.target_ongoing_requests}, "
            f"metrics_interval_s={a.metrics_interval_s})"
        )
    if a.enabled and 0 < a.look_back_period_s <= a.metrics_interval_s:
        p.append(
            f"serve.autoscaling.look_back_period_s={a.look_back_period_s}: must be > "
            f"serve.autoscaling.metrics_interval_s ({a.metrics_interval_s}), the window must hold load figures"
        )
    if not a.enabled and s.num_replicas < 1:
        p.append(f"serve.num_replicas={s.num_replicas}: must be >= 1")

    c = cfg.cluster
    _one_of(p, "cluster.mode", c.mode, ("local", "remote"))
    if c.mode == "local":
        need = t.num_workers * t.cpus_per_worker
        if need > c.num_cpus:
            # Ray Train places all workers at once or none: this would wait forever.
            p.append(
                f"train.num_workers={t.num_workers}: {t.num_workers} workers x {t.cpus_per_worker} CPUs "
                f"= {need} exceeds cluster.num_cpus ({c.num_cpus}); Ray Train would wait forever"
            )
        if t.use_gpu and t.num_workers * t.gpus_per_worker > c.num_gpus:
            p.append(
                f"train.use_gpu=true: {t.num_workers} workers x {t.gpus_per_worker} GPUs exceeds "
                f"cluster.num_gpus ({c.num_gpus})"
            )

    k8s = c.k8s
    for key in ("gpus_per_node", "job_ttl_seconds"):
        if getattr(k8s, key) < 0:
            p.append(f"cluster.k8s.{key}={getattr(k8s, key)}: must be >= 0")
    for key in ("head_cpus", "worker_cpus", "job_deadline_seconds"):
        if getattr(k8s, key) < 1:
            p.append(f"cluster.k8s.{key}={getattr(k8s, key)}: must be >= 1")
    for key in ("namespace", "image", "secret_name"):
        if not getattr(k8s, key):
            p.append(f"cluster.k8s.{key}='': must be set")
    if k8s.tracking_uri and "://" not in k8s.tracking_uri:
        p.append(
            f"cluster.k8s.tracking_uri={k8s.tracking_uri!r}: must be a URI such as http://mlflow.example:5000"
        )

    for stage in cfg.stages:
        _one_of(p, "stages[]", stage, STAGES)
    if len(set(cfg.stages)) != len(cfg.stages):
        p.append(f"stages={cfg.stages}: a stage may appear once")
    for name in cfg.inputs:
        _one_of(p, f"inputs.{name}", name, STAGES)

    for key in ("lr", "min_lr_ratio"):
        v = getattr(t, key)
        if isinstance(v, float) and not math.isfinite(v):
            p.append(f"train.{key}={v}: must be finite")
    if p:
        raise ConfigError(p)
