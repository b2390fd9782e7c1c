"""The one schema of moeops' configuration.

Every YAML file under ``conf/`` is merged onto these dataclasses by Hydra, so an
unknown key or a wrongly typed value fails at composition time.  Rules that span
several fields live in :mod:`components.config.validate`.  Each section's doc
string is the reference for its config group (see ``docs/config.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PathsConfig:
    """Where moeops keeps local state. Made absolute on the driver before any use."""

    root: str = ".moeops"


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing (group ``data``)."""

    name: str = "stdlib"
    # "stdlib": the running interpreter's standard-library sources (exists on every machine);
    # "files": text / JSONL / Parquet files at ``uri`` (any fsspec URI or glob).
    source: str = "stdlib"
    uri: str = ""
    text_field: str = "text"
    max_files: int = 400
    max_bytes: int = 8_000_000
    vocab_size: int = 4096
    byte_fallback: bool = True
    seq_len: int = 128
    val_fraction: float = 0.05
    # rows (of seq_len + 1 tokens) per shard; 0: as many as fit ``shard_mb`` MiB of int32 tokens
    rows_per_shard: int = 0
    # shard size when rows_per_shard is 0 (before compression; mosaicml-streaming's default is 64 MB
    # too)
    shard_mb: int = 64
    seed: int = 1234
    # chunks of the corpus tokenized and written at once (Ray tasks in flight)
    prepare_parallelism: int = 2


@dataclass
class StorageConfig:
    """Cold object store, warm disk cache and hot prefetch (group ``storage``)."""

    name: str = "local"
    cold_uri: str = "${paths.root}/cold"
    # s3-compatible object stores: endpoint and region; credentials come from the
    # environment variables named here, never from config files.
    endpoint_url: str = ""
    region: str = ""
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    warm_dir: str = "${paths.root}/warm"
    # the warm cache never holds more shard bytes than this (LRU eviction)
    warm_limit_bytes: int = 2 * 1024**3
    # re-check a warm shard's sha256 on every open (its size always is; Parquet page CRCs on decode)
    verify_on_open: bool = False
    # shards fetched (and decoded) ahead at most; the reader goes as deep as the measured fetch time
    # needs to keep up with consumption
    parallel_fetches: int = 4
    # objects larger than this are fetched as concurrent ranged GETs of this size
    part_mb: int = 16
    retries: int = 5
    backoff_base_s: float = 0.2
    backoff_max_s: float = 8.0
    # batches made ready by the hot tier's background thread (0: produced on demand)
    hot_prefetch_batches: int = 4


@dataclass
class ModelConfig:
    """Decoder-only transformer; MoE FFN on every ``moe_layer_interval``-th layer (group
    ``model``)."""

    name: str = "moe_tiny"
    # "moe" or "dense"; a dense model with the same dims has ffn_dim = top_k * expert ffn_dim
    # (+ shared expert), i.e. equal active parameters.
    kind: str = "moe"
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 256
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    moe_layer_interval: int = 1
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    dropless: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    shared_expert: bool = False
    # constant multiplier of the routed experts' gate weights (DeepSeek-V3's
    # routed_scaling_factor). With top_k > 1 the renormalised weights sum to 1, so the routed
    # output is a convex combination of k experts of width ffn_dim while the dense equivalent sums
    # k x ffn_dim hidden units; a factor restores the dense output scale. Folds exactly into each
    # expert's down projection (w2) on export.
    routed_scaling_factor: float = 1.0
    # DeepSeek-V3 auxiliary-loss-free balancing: a per-expert router bias (selection only, never
    # the gate weights) moved by bias_update_rate * sign(mean load - load) once per optimizer
    # step, from the step's expert counts summed over its micro-batches and all ranks.
    bias_balancing: bool = False
    bias_update_rate: float = 0.001
    tie_embeddings: bool = True
    init_std: float = 0.02
    # how the experts run: "grouped_mm" (torch.nn.functional.grouped_mm, one kernel for all local
    # experts), "loop" (one matmul per expert) or "auto" (grouped_mm for CUDA bf16 on SM90/SM100,
    # else loop)
    expert_backend: str = "auto"


@dataclass
class OverlapConfig:
    """Compute-communication overlap switches, each measurable on its own."""

    # expert-parallel all-to-alls issued asynchronously and pipelined over chunks, with the shared
    # expert computing during the first dispatch; false: blocking all-to-alls, one chunk
    async_a2a: bool = True
    # local tokens split into this many chunks (>= 2 overlaps one chunk's all-to-all with
    # another's experts, forward and backward); used only with async_a2a
    a2a_chunks: int = 2
    ddp_bucket_mb: int = 25
    prefetch: bool = True


@dataclass
class TrainConfig:
    """Ray Train scaling, optimisation, precision and checkpointing (group ``train``)."""

    name: str = "cpu"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # "auto": nccl with GPUs, gloo otherwise.
    backend: str = "auto"
    # ranks that share one copy of the experts (num_experts / expert_parallel_size on each);
    # divides num_workers; 1 = experts replicated (plain data parallelism)
    expert_parallel_size: int = 1
    # "fp32", "bf16" (autocast, GPU) or "fp16" (autocast + a loss scaler whose skip verdict all
    # ranks agree on, GPU). A step whose global gradient norm is not finite is skipped everywhere.
    precision: str = "fp32"
    # how the non-expert parameters are kept in sync over the ranks: "ddp" (replicated, gradients
    # all-reduced in buckets during backward) or "fsdp" (FSDP2 fully_shard: parameters, gradients
    # and AdamW state sharded; under bf16 the compute copy is bf16, master weights and gradient
    # reductions fp32; experts sharded over their expert-data-parallel group)
    data_parallel: str = "ddp"
    # recompute activations in backward instead of keeping them: "none"; "selective" (each
    # block's attention sublayer and dense FFN, never the MoE layer, whose dispatch results stay
    # saved so an expert-parallel layer does not repeat its all-to-alls and split-size sync);
    # "full" (whole blocks, the MoE layer's all-to-alls included)
    activation_checkpointing: str = "none"
    # torch.compile each block's attention, norms and dense FFN (the MoE dispatcher, with its
    # data-dependent shapes and collectives, stays eager); compile_backend is torch.compile's
    compile: bool = False
    compile_backend: str = "inductor"
    # environment of every Ray process on GPU nodes (rendered into the KubeRay manifests; also in
    # infra/runtime_env.yaml): NCCL logging, the flight recorder, fabric knobs (docs/cluster.md)
    nccl_env: dict[str, str] = field(default_factory=dict)
    # per rank and micro-batch; a step sees batch_size x grad_accum_steps x num_workers sequences
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 200
    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 50
    checkpoint_uri: str = "${paths.root}/checkpoints"
    keep_checkpoints: int = 2
    # upload each checkpoint in the background while training continues (Ray Train's async
    # upload); a checkpoint counts only once every rank's upload finished
    async_checkpoint: bool = False
    max_failures: int = 2
    # how long Ray Train waits for a worker group to start (placement + each worker importing
    # torch) before it gives up and retries; Ray's own 60 s is too short on a busy machine
    worker_start_timeout_s: float = 300.0
    # "auto": continue from the latest checkpoint of this run; "never"; or a checkpoint path.
    resume: str = "auto"
    # stop (after writing a checkpoint) once this many steps are done; 0 = run to max_steps.
    # The schedule still spans max_steps, so a later resume continues the same curve.
    stop_at_step: int = 0
    seed: int = 0
    overlap: OverlapConfig = field(default_factory=OverlapConfig)


@dataclass
class TuneConfig:
    """Ray Tune sweep over shortened training runs (group ``tune``)."""

    name: str = "small"
    enabled: bool = True
    num_samples: int = 2
    # 0: derived from the cluster's resources so trials never wait on each other.
    max_concurrent_trials: int = 0
    metric: str = "val_loss"
    mode: str = "min"
    # "optuna" or "random"
    search_alg: str = "optuna"
    # "asha" or "fifo"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    trial_max_steps: int = 40
    trial_num_workers: int = 1
    trial_eval_every: int = 10
    # dotted config key -> {type: loguniform|uniform|choice|randint, low, high, values}
    search_space: dict[str, Any] = field(default_factory=dict)
    # trials to run first, before the search algorithm proposes any: [{"train.lr": 0.003}, ...]
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    # CPUs reserved for each trial's own process (it drives one Ray Train run)
    trial_driver_cpus: float = 0.5
    # continue an interrupted sweep with the same config (Tuner.restore) instead of starting over
    resume: bool = True
    seed: int = 0


@dataclass
class EvaluateConfig:
    """Held-out evaluation and the comparison report."""

    eval_batches: int = 16
    compare_dense: bool = True
    dense_max_steps: int = 0  # 0: same number of steps as the MoE training
    compare_champion: bool = True
    prompts: list[str] = field(
        default_factory=lambda: ["def main(", "import os\n", "class Config:", "# Licensed"]
    )
    max_new_tokens: int = 32
    throughput_batch_size: int = 8


@dataclass
class RegistryConfig:
    """MLflow model registry and the champion/challenger gate."""

    model_name: str = "moeops-moe"
    metric: str = "val_loss"
    mode: str = "min"
    # a challenger must beat the champion by at least this much (absolute, in metric units)
    min_improvement: float = 0.0
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    # With no earlier champion, promote the challenger only when its held-out val_loss is below
    # its dense equivalent's (the evaluate stage's dense baseline, same data and steps): an MoE
    # that loses to the dense model of equal active size is no reason to serve it. false: the
    # first challenger is promoted whatever it scores (the reason says so).
    require_dense_win: bool = True


@dataclass
class AutoscalingConfig:
    """Serve's request-based autoscaling of the replicas (``serve.autoscaling``)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    # requests in flight per replica that Serve steers towards (running + queued sequences'
    # requests)
    target_ongoing_requests: float = 8.0
    # how long load must stay above / below target before a replica is added / removed
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # window the load is averaged over (Serve pushes load figures every metrics_interval_s: keep it
    # above that)
    look_back_period_s: float = 30.0
    # how often replicas and proxies push their load to Serve's controller (Ray's default: 10 s).
    # Ray 2.60
    # marks the field deprecated in favour of env vars it does not read yet; it is sent only when
    # changed
    metrics_interval_s: float = 10.0


@dataclass
class ServeConfig:
    """Ray Serve application (group ``serve``)."""

    name: str = "local"
    app_name: str = "moeops"
    # "moeops": the embedded engine (CPU or GPU, every route of docs/serving.md); "vllm": Ray Serve
    # LLM (vLLM) on GPU replicas, serving the version's Hugging Face export (serving/llm_app.py)
    engine: str = "moeops"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    # default: models:/<registry.model_name>@<registry.champion_alias>
    model_uri: str = ""
    num_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # continuous batching: sequences decoded together (KV-cache slots per model version and replica)
    max_num_seqs: int = 16
    # prompt tokens admitted into one decode step (a burst of long prompts joins over several steps)
    max_num_batched_tokens: int = 512
    # sequences waiting for a slot per replica; beyond it a request gets 429 with Retry-After
    max_queued_sequences: int = 64
    # the Retry-After (seconds) of a 429 (queue full) or 503 (not ready yet)
    retry_after_s: int = 1
    max_prompt_tokens: int = 128
    max_tokens: int = 64
    max_prompts: int = 16
    # upper bound of a request's n and best_of
    max_n: int = 4
    # upper bound of completions' logprobs and chat's top_logprobs
    max_logprobs: int = 20
    max_body_bytes: int = 65536
    canary_fraction: float = 0.0
    # int8 inference (docs/quantization.md): "auto" = int8 only where it measured faster than
    # float (CPU replicas of models whose dim x ffn_dim >= 128K, e.g. moe_small's sizes; moe_tiny
    # and CUDA replicas serve float); "int8" = always (fbgemm on CPU, torchao on CUDA); "none"
    quantize: str = "auto"
    # bearer token: read from this environment variable; empty variable = auth off
    auth_token_env: str = "MOEOPS_API_TOKEN"
    smoke_prompt: str = "def "
    # HTTP requests Serve sends a replica at once; must cover max_num_seqs + max_queued_sequences
    # (each request is at least one sequence) plus probes, or the proxy queues what the engine could
    # take
    max_ongoing_requests: int = 96
    # extra replicas (percent) during a rolling update: old replicas serve until the new ones are
    # warm
    max_surge_percent: int = 100
    # "HeadOnly" (one proxy, local) or "EveryNode" (a proxy per node, clusters)
    proxy_location: str = "HeadOnly"
    # a replica that cannot load its model yet (alias not set) retries this often, staying unready
    load_retry_s: float = 2.0
    # deploy stage: how long to wait for /readyz, and whether to keep the process serving until
    # Ctrl-C
    ready_timeout_s: float = 180.0
    block: bool = False


@dataclass
class TrackingConfig:
    """MLflow tracking (group ``tracking``)."""

    name: str = "sqlite"
    # empty: $MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db
    uri: str = ""
    experiment: str = "moeops"
    # artifact root for new experiments on a sqlite store; empty: <cwd>/mlartifacts
    artifact_location: str = ""


@dataclass
class KubernetesConfig:
    """KubeRay manifests rendered by ``python -m pipelines.render`` (see docs/cluster.md)."""

    namespace: str = "moeops"
    # must hold the project and its dependencies: build it from infra/Dockerfile
    image: str = "moeops:latest"
    head_cpus: int = 8
    head_memory: str = "32Gi"
    # one Ray worker pod per node; 0 renders a CPU-only worker group
    gpus_per_node: int = 8
    worker_cpus: int = 96
    worker_memory: str = "768Gi"
    # node selector value for nvidia.com/gpu.product (empty: no selector)
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    # Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / POSTGRES_PASSWORD (and any
    # MLFLOW_TRACKING_* auth); created with kubectl, never rendered
    secret_name: str = "moeops-credentials"
    # empty: render an MLflow server (PostgreSQL backend, S3 artifacts) in the namespace
    tracking_uri: str = ""
    mlflow_image: str = "ghcr.io/mlflow/mlflow:v3.17.2"
    mlflow_artifacts_uri: str = "s3://moeops/mlflow"
    # RayJob: delete the cluster this long after the job ends; kill the job after the deadline
    job_ttl_seconds: int = 3600
    job_deadline_seconds: int = 172800


@dataclass
class ClusterConfig:
    """Where Ray runs (group ``cluster``)."""

    name: str = "local"
    # "local": start a single-node Ray here; "remote": join $RAY_ADDRESS or ``address``.
    mode: str = "local"
    address: str = ""
    # logical resources of the local node (may exceed the physical cores)
    num_cpus: int = 4
    num_gpus: int = 0
    object_store_memory_mb: int = 512
    namespace: str = "moeops"
    k8s: KubernetesConfig = field(default_factory=KubernetesConfig)


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # rerun stages even when a finished run with the same inputs and config exists
    force: bool = False
    run_name: str = ""
    # upstream stage name -> MLflow run id or runs:/<id> URI to take its outputs from
    # (empty: the latest finished run of that stage in the experiment)
    inputs: dict[str, str] = field(default_factory=dict)
    # stages pipelines.run executes, in order
    stages: list[str] = field(
        default_factory=lambda: ["prepare", "tune", "train", "evaluate", "register", "deploy"]
    )
