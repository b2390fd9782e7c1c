"""The one schema of moeops' configuration: every default lives here, and nowhere else.

Every YAML file under ``conf/`` is merged onto these dataclasses by Hydra, so an unknown key, a
wrongly typed value or a choice outside its enum fails at composition time with the key, the
value and what is allowed. Each field's meaning is the one-line docstring under it
(``docs/config.md`` is generated from them: ``python -m components.config.docs``). Each section
checks its own rules (``problems()``, beside its fields); rules that span sections live in
:mod:`components.config.validate`. Choices are ``StrEnum``s (OmegaConf 2.3 rejects ``Literal``):
their members compare, hash, format and JSON-encode as the plain strings they name.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class DataSource(StrEnum):
    stdlib = "stdlib"
    files = "files"


class ModelKind(StrEnum):
    moe = "moe"
    dense = "dense"


class ExpertBackend(StrEnum):
    auto = "auto"
    grouped_mm = "grouped_mm"
    loop = "loop"


class DistBackend(StrEnum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DataParallel(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class ActivationCheckpointing(StrEnum):
    none = "none"
    selective = "selective"
    full = "full"


class Mode(StrEnum):
    min = "min"
    max = "max"


class SearchAlg(StrEnum):
    optuna = "optuna"
    random = "random"


class Scheduler(StrEnum):
    asha = "asha"
    fifo = "fifo"


class RegistryMetric(StrEnum):
    """Held-out figures the evaluate stage measures for every model it compares."""

    val_loss = "val_loss"
    perplexity = "perplexity"
    generation_tokens_per_s = "generation_tokens_per_s"


class Quantize(StrEnum):
    none = "none"
    int8 = "int8"
    auto = "auto"


class ProxyLocation(StrEnum):
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"
    Disabled = "Disabled"


class ServeEngine(StrEnum):
    moeops = "moeops"
    vllm = "vllm"


class ClusterMode(StrEnum):
    local = "local"
    remote = "remote"


class Stage(StrEnum):
    prepare = "prepare"
    tune = "tune"
    train = "train"
    evaluate = "evaluate"
    register = "register"
    deploy = "deploy"


SEARCH_TYPES = ("loguniform", "uniform", "choice", "randint", "quniform")


def _at_least(section: Any, prefix: str, keys: tuple[str, ...], low: float) -> list[str]:
    return [
        f"{prefix}.{key}={getattr(section, key)}: must be >= {low}"
        for key in keys
        if getattr(section, key) < low
    ]


@dataclass
class PathsConfig:
    """Where moeops keeps local state. Made absolute on the driver before any use."""

    root: str = ".moeops"
    """Directory of local state: cold tier, warm cache, checkpoints, exports, sweeps."""

    def problems(self) -> list[str]:
        return []


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing (group ``data``)."""

    name: str = "stdlib"
    """Name of the group option (for run names and params)."""
    source: DataSource = DataSource.stdlib
    """stdlib: the interpreter's standard-library sources; files: text/JSONL/Parquet at uri."""
    uri: str = ""
    """fsspec URI or glob of the corpus files (source=files)."""
    text_field: str = "text"
    """Field of a JSONL record or Parquet column that holds the text."""
    max_files: int = 400
    """At most this many corpus files are read."""
    max_bytes: int = 8_000_000
    """At most this many corpus bytes are read."""
    vocab_size: int = 4096
    """BPE vocabulary size (>= 300: 256 byte symbols plus merges)."""
    byte_fallback: bool = True
    """Unknown characters become byte tokens instead of an unknown token."""
    seq_len: int = 128
    """Tokens per training sequence (a row holds seq_len + 1)."""
    val_fraction: float = 0.05
    """Fraction of the packed rows held out for validation."""
    rows_per_shard: int = 0
    """Rows per shard; 0: as many as fit shard_mb MiB of int32 tokens."""
    shard_mb: int = 64
    """Shard size when rows_per_shard is 0, before compression (streaming's default too)."""
    seed: int = 1234
    """Seed of the train/validation split and the shard order."""
    shuffle_block_shards: int = 8
    """Train shards whose rows are shuffled together (streaming's shuffle block); the reader holds
    a block's shards decoded in memory. 1: one shard after another (batches of a few documents)."""
    prepare_parallelism: int = 2
    """Corpus chunks tokenized and written at once (Ray tasks in flight)."""

    def problems(self) -> list[str]:
        p = []
        if self.source == DataSource.files and not self.uri:
            p.append(
                "data.uri='': data.source='files' needs an fsspec URI or glob of "
                "text/JSONL/Parquet files"
            )
        if self.seq_len < 8:
            p.append(f"data.seq_len={self.seq_len}: must be >= 8")
        if not 0 < self.val_fraction < 1:
            p.append(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.vocab_size < 300:
            p.append(
                f"data.vocab_size={self.vocab_size}: must be >= 300 (256 byte symbols plus merges)"
            )
        if self.rows_per_shard < 0:
            p.append(
                f"data.rows_per_shard={self.rows_per_shard}: must be >= 1, or 0 to size shards "
                "by data.shard_mb"
            )
        if self.max_files < 1 or self.max_bytes < 1:
            p.append(
                f"data.max_files={self.max_files}, data.max_bytes={self.max_bytes}: must be >= 1"
            )
        return p + _at_least(self, "data", ("shard_mb", "shuffle_block_shards"), 1)


@dataclass
class StorageConfig:
    """Cold object store, warm disk cache and hot prefetch (group ``storage``)."""

    name: str = "local"
    """Name of the group option."""
    cold_uri: str = "${paths.root}/cold"
    """Cold tier: a local directory or an fsspec URI (s3://bucket/prefix)."""
    endpoint_url: str = ""
    """S3-compatible endpoint (empty: AWS)."""
    region: str = ""
    """S3 region (empty: the client's default)."""
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    """Environment variable holding the access key (never the key itself)."""
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    """Environment variable holding the secret key (never the key itself)."""
    warm_dir: str = "${paths.root}/warm"
    """Warm tier: local disk cache of shards."""
    warm_limit_bytes: int = 2 * 1024**3
    """The warm cache never holds more shard bytes than this (LRU eviction)."""
    verify_on_open: bool = False
    """Re-check a warm shard's sha256 on every open (its size always is)."""
    parallel_fetches: int = 4
    """Shards fetched and decoded ahead at most (the reader goes as deep as it needs)."""
    part_mb: int = 16
    """Objects larger than this are fetched as concurrent ranged GETs of this size."""
    retries: int = 5
    """Retries of a failed cold-tier request."""
    backoff_base_s: float = 0.2
    """First retry back-off (doubles per retry)."""
    backoff_max_s: float = 8.0
    """Longest retry back-off."""
    hot_prefetch_batches: int = 4
    """Batches made ready by the hot tier's background thread (0: produced on demand)."""

    def problems(self) -> list[str]:
        p = []
        if self.warm_limit_bytes <= 0:
            p.append(f"storage.warm_limit_bytes={self.warm_limit_bytes}: must be > 0")
        if self.hot_prefetch_batches < 0:
            p.append(
                f"storage.hot_prefetch_batches={self.hot_prefetch_batches}: must be >= 0 "
                "(0 = no prefetch thread)"
            )
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            p.append(
                f"storage.backoff_base_s={self.backoff_base_s}: must be > 0 and <= "
                f"storage.backoff_max_s ({self.backoff_max_s})"
            )
        if not self.cold_uri:
            p.append(
                "storage.cold_uri='': needs a local directory or an fsspec URI "
                "(s3://bucket/prefix, gs://...)"
            )
        p += _at_least(self, "storage", ("retries",), 0)
        return p + _at_least(self, "storage", ("parallel_fetches", "part_mb"), 1)


@dataclass
class ModelConfig:
    """Decoder-only transformer; MoE FFN on every ``moe_layer_interval``-th layer (group
    ``model``)."""

    name: str = "moe_tiny"
    """Name of the group option."""
    kind: ModelKind = ModelKind.moe
    """moe, or dense (one SwiGLU FFN of ffn_dim per layer: the baseline)."""
    dim: int = 128
    """Model width."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (dim / n_heads must be even for rotary embeddings)."""
    ffn_dim: int = 256
    """Hidden size of each expert's (or the dense) SwiGLU FFN."""
    max_seq_len: int = 256
    """Longest context (rotary tables, KV cache)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    moe_layer_interval: int = 1
    """Every moe_layer_interval-th block has an MoE FFN."""
    num_experts: int = 4
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is routed to."""
    capacity_factor: float = 1.25
    """Expert capacity in training = capacity_factor x tokens x top_k / num_experts."""
    dropless: bool = False
    """No capacity limit (no token dropped) in training too."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing auxiliary loss."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss."""
    shared_expert: bool = False
    """One dense expert every token passes through, beside the routed ones."""
    routed_scaling_factor: float = 1.0
    """Constant on the routed gate weights after renormalising (DeepSeek-V3's key): the k weights
    sum to 1, so the routed output averages k experts while the dense equivalent sums k x ffn_dim
    hidden units; top_k restores the dense scale. Folds into each expert's down_proj on export."""
    bias_balancing: bool = False
    """DeepSeek-V3 auxiliary-loss-free balancing: a per-expert selection bias moved each step."""
    bias_update_rate: float = 0.001
    """Step of that bias: rate x sign(mean load - load), once per optimizer step."""
    tie_embeddings: bool = True
    """Output projection shares the token embedding's weights."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    router_init_scale: float = 1.0
    """Router init std = init_std x router_init_scale (small: near-uniform routing at first)."""
    ffn_out_init_scale: float = 1.0
    """FFN down projections (w2 of the dense FFN, every routed expert and the shared expert) start
    at std init_std / sqrt(2 n_layers) x this: GPT-2's depth scaling, then this factor."""
    expert_backend: ExpertBackend = ExpertBackend.auto
    """grouped_mm (one kernel), loop (a matmul per expert), auto (grouped_mm for CUDA bf16)."""

    def problems(self) -> list[str]:
        p = _at_least(
            self,
            "model",
            ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "num_experts"),
            1,
        )
        if self.n_heads >= 1 and self.dim % self.n_heads:
            p.append(f"model.dim={self.dim}: must be divisible by model.n_heads ({self.n_heads})")
        elif self.n_heads >= 1 and (self.dim // self.n_heads) % 2:
            p.append(
                f"model.dim={self.dim}: head size dim/n_heads={self.dim // self.n_heads} must be "
                "even for rotary embeddings"
            )
        if not (math.isfinite(self.ffn_out_init_scale) and self.ffn_out_init_scale > 0):
            p.append(f"model.ffn_out_init_scale={self.ffn_out_init_scale}: must be > 0")
        if self.kind != ModelKind.moe:
            return p
        if not 1 <= self.top_k <= self.num_experts:
            p.append(
                f"model.top_k={self.top_k}: must be between 1 and model.num_experts "
                f"({self.num_experts})"
            )
        if self.capacity_factor <= 0 and not self.dropless:
            p.append(
                f"model.capacity_factor={self.capacity_factor}: must be > 0 "
                "(or set model.dropless=true)"
            )
        if self.routed_scaling_factor <= 0:
            p.append(f"model.routed_scaling_factor={self.routed_scaling_factor}: must be > 0")
        if self.moe_layer_interval < 1:
            p.append(f"model.moe_layer_interval={self.moe_layer_interval}: must be >= 1")
        elif self.moe_layer_interval > self.n_layers:
            p.append(
                f"model.moe_layer_interval={self.moe_layer_interval}: exceeds model.n_layers "
                f"({self.n_layers}), so no layer would be MoE (use model.kind=dense for that)"
            )
        if not (math.isfinite(self.router_init_scale) and self.router_init_scale > 0):
            # 0 would tie every router score, and top-k would send all tokens to experts 0..k-1
            p.append(f"model.router_init_scale={self.router_init_scale}: must be > 0")
        return p + _at_least(self, "model", ("aux_loss_coef", "z_loss_coef", "bias_update_rate"), 0)


@dataclass
class OverlapConfig:
    """Compute-communication overlap switches, each measurable on its own (``train.overlap``)."""

    async_a2a: bool = True
    """Asynchronous all-to-alls pipelined over chunks; false: blocking, one chunk."""
    a2a_chunks: int = 2
    """Local tokens split into this many chunks (>= 2 overlaps one's all-to-all with another)."""
    ddp_bucket_mb: int = 25
    """DDP gradient bucket size: a full bucket is all-reduced during the rest of backward."""
    prefetch: bool = True
    """The reader prepares the next batch while the step runs."""

    def problems(self) -> list[str]:
        return _at_least(self, "train.overlap", ("a2a_chunks",), 1)


@dataclass
class TrainConfig:
    """Ray Train scaling, optimisation, precision and checkpointing (group ``train``)."""

    name: str = "cpu"
    """Name of the group option."""
    num_workers: int = 2
    """Ray Train workers (ranks)."""
    use_gpu: bool = False
    """One GPU per worker (gpus_per_worker) and CUDA training."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker."""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves per worker (use_gpu)."""
    backend: DistBackend = DistBackend.auto
    """torch.distributed backend; auto: nccl with GPUs, gloo otherwise."""
    expert_parallel_size: int = 1
    """Ranks sharing one copy of the experts (num_experts / size each); divides num_workers."""
    precision: Precision = Precision.fp32
    """fp32; bf16 or fp16 autocast (GPU; fp16 with an agreed loss-scaler skip verdict)."""
    data_parallel: DataParallel = DataParallel.ddp
    """Non-expert parameters: ddp (replicated, bucketed all-reduce) or fsdp (FSDP2, sharded)."""
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    """Recompute in backward: none; selective (attention and dense FFN, not MoE); full blocks."""
    compile: bool = False
    """torch.compile each block's attention, norms and dense FFN (MoE dispatch stays eager)."""
    compile_backend: str = "inductor"
    """torch.compile's backend."""
    nccl_env: dict[str, str] = field(default_factory=dict)
    """Environment of every Ray process on GPU nodes: NCCL logging, flight recorder, fabrics."""
    batch_size: int = 8
    """Sequences per rank and micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 200
    """Optimizer steps; the learning-rate schedule spans them."""
    lr: float = 3.0e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr x min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not on norms and biases)."""
    router_lr_scale: float = 1.0
    """The routers' learning rate = lr x router_lr_scale (same schedule and weight decay)."""
    expert_lr_scale: float = 1.0
    """The routed experts' learning rate = lr x expert_lr_scale (same schedule and weight decay)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (experts included)."""
    eval_every: int = 50
    """Steps between held-out evaluations (each one is reported to Ray Train / Tune)."""
    eval_batches: int = 8
    """Held-out batches per evaluation."""
    log_every: int = 10
    """Steps between MLflow step-metric logs."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    checkpoint_uri: str = "${paths.root}/checkpoints"
    """Where Ray Train keeps checkpoints: a directory or an object-store URI."""
    keep_checkpoints: int = 2
    """Checkpoints kept per run (resume needs the latest)."""
    async_checkpoint: bool = False
    """Upload checkpoints in the background while training continues (Ray Train async upload)."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint (-1: unlimited)."""
    worker_start_timeout_s: float = 300.0
    """How long Ray Train waits for a worker group to start (Ray's own 60 s is short here)."""
    resume: str = "auto"
    """auto: continue this run's latest checkpoint; never; or a checkpoint path/URI."""
    stop_at_step: int = 0
    """Stop (after a checkpoint) at this step; 0: run to max_steps. The schedule is unchanged."""
    seed: int = 0
    """Seed of the weights and the data order."""
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    """Compute-communication overlap switches."""

    def problems(self) -> list[str]:
        p = self.overlap.problems()
        if self.expert_parallel_size < 1:
            p.append(f"train.expert_parallel_size={self.expert_parallel_size}: must be >= 1")
        elif self.num_workers % self.expert_parallel_size:
            p.append(
                f"train.num_workers={self.num_workers}: must be a multiple of "
                f"train.expert_parallel_size ({self.expert_parallel_size})"
            )
        if self.num_workers < 1:
            p.append(f"train.num_workers={self.num_workers}: must be >= 1")
        for key in ("router_lr_scale", "expert_lr_scale"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                p.append(f"train.{key}={value}: must be > 0")
        if self.precision in (Precision.bf16, Precision.fp16) and not self.use_gpu:
            p.append(
                f"train.precision='{self.precision}': mixed precision needs train.use_gpu=true "
                "(CPU trains in fp32)"
            )
        if self.backend == DistBackend.nccl and not self.use_gpu:
            p.append("train.backend='nccl': needs train.use_gpu=true (use 'gloo' or 'auto' on CPU)")
        if self.use_gpu and self.gpus_per_worker <= 0:
            p.append(
                f"train.gpus_per_worker={self.gpus_per_worker}: must be > 0 when train.use_gpu=true"
            )
        if (
            self.use_gpu
            and self.backend in (DistBackend.auto, DistBackend.nccl)
            and self.gpus_per_worker % 1
        ):
            # NCCL refuses two ranks on one device ("Duplicate GPU detected") at the 1st collective
            p.append(
                f"train.gpus_per_worker={self.gpus_per_worker}: NCCL needs whole GPUs per worker "
                "(1, 2, ...); fractional GPUs only with train.backend='gloo'"
            )
        if self.data_parallel == DataParallel.fsdp and self.precision == Precision.fp16:
            p.append(
                "train.data_parallel='fsdp' with train.precision='fp16': not supported "
                "(FSDP2 runs bf16 or fp32; fp16's loss scaler is kept for the DDP path)"
            )
        p += _at_least(
            self,
            "train",
            ("batch_size", "grad_accum_steps", "max_steps", "eval_every", "log_every"),
            1,
        )
        p += _at_least(self, "train", ("checkpoint_every",), 1)
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            p.append(
                f"train.warmup_steps={self.warmup_steps}: must be >= 0 and < train.max_steps "
                f"({self.max_steps})"
            )
        if not (math.isfinite(self.lr) and 0 < self.lr < 1):
            p.append(f"train.lr={self.lr}: must be in (0, 1)")
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            p.append(f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0 <= self.stop_at_step <= self.max_steps:
            p.append(
                f"train.stop_at_step={self.stop_at_step}: must be between 0 (off) and "
                f"train.max_steps ({self.max_steps})"
            )
        if not self.resume.strip():
            p.append("train.resume='': must be 'auto', 'never' or a checkpoint path/URI")
        if self.keep_checkpoints < 1:
            p.append(
                f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 1 "
                "(resume needs the latest checkpoint)"
            )
        if self.max_failures < -1:
            p.append(
                f"train.max_failures={self.max_failures}: must be >= 0, or -1 for unlimited retries"
            )
        if self.worker_start_timeout_s <= 0:
            p.append(
                f"train.worker_start_timeout_s={self.worker_start_timeout_s}: must be > 0 "
                "(seconds Ray Train waits for its workers to start)"
            )
        return p


@dataclass
class TuneConfig:
    """Ray Tune sweep over shortened training runs (group ``tune``)."""

    name: str = "small"
    """Name of the group option."""
    enabled: bool = True
    """Run the sweep; false: train uses the config as composed."""
    num_samples: int = 2
    """Trials."""
    max_concurrent_trials: int = 0
    """Trials at once; 0: as many as the cluster's resources fit."""
    metric: str = "val_loss"
    """Reported metric the sweep optimises."""
    mode: Mode = Mode.min
    """Whether the metric is minimised or maximised."""
    search_alg: SearchAlg = SearchAlg.optuna
    """optuna (TPE) or random search."""
    scheduler: Scheduler = Scheduler.asha
    """asha (stops weak trials early) or fifo (every trial runs to the end)."""
    grace_period: int = 1
    """ASHA: evaluations before a trial may be stopped."""
    reduction_factor: int = 2
    """ASHA: 1 / fraction of trials kept at each rung."""
    trial_max_steps: int = 40
    """Training steps of one trial."""
    trial_num_workers: int = 1
    """Ray Train workers of one trial (a multiple of train.expert_parallel_size)."""
    trial_eval_every: int = 10
    """Steps between a trial's evaluations (its reports to Tune)."""
    search_space: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> {type: loguniform, uniform, quniform, randint or choice; low, high, values}."""
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    """Trials run first, before the search algorithm proposes any: [{train.lr: 0.003}, ...]."""
    trial_driver_cpus: float = 0.5
    """CPUs reserved for each trial's own process (it drives one Ray Train run)."""
    resume: bool = True
    """Continue an interrupted sweep with the same config, data and code (Tuner.restore)."""
    seed: int = 0
    """Seed of the search algorithm."""

    def problems(self) -> list[str]:
        """A sweep that is off is never run: its settings must not block the training that is."""
        if not self.enabled:
            return []
        p = _at_least(self, "tune", ("num_samples",), 1)
        if self.trial_max_steps < 1 or self.trial_eval_every < 1:
            p.append(
                f"tune.trial_max_steps={self.trial_max_steps}, "
                f"tune.trial_eval_every={self.trial_eval_every}: must be >= 1"
            )
        if self.trial_driver_cpus < 0:
            p.append(f"tune.trial_driver_cpus={self.trial_driver_cpus}: must be >= 0")
        for key, spec in self.search_space.items():
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in SEARCH_TYPES:
                p.append(
                    f"tune.search_space.{key}.type={kind!r}: must be one of "
                    f"{', '.join(SEARCH_TYPES)}"
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
                    f"tune.search_space.{key}: {kind} needs numbers low < high, got "
                    f"low={spec.get('low')!r} high={spec.get('high')!r}"
                )
            elif kind == "loguniform" and spec["low"] <= 0:
                p.append(f"tune.search_space.{key}.low={spec['low']}: loguniform needs low > 0")
        return p


@dataclass
class EvaluateConfig:
    """Held-out evaluation and the comparison report (``evaluate``)."""

    eval_batches: int = 16
    """Held-out batches per evaluated model."""
    compare_dense: bool = True
    """Train and evaluate the dense baseline with equal active parameters."""
    dense_max_steps: int = 0
    """Training steps of the dense baseline; 0: as many as the MoE training."""
    compare_champion: bool = True
    """Evaluate the registry's champion on the same data."""
    prompts: list[str] = field(
        default_factory=lambda: ["def main(", "import os\n", "class Config:", "# Licensed"]
    )
    """Prompts of the report's greedy samples."""
    max_new_tokens: int = 32
    """Tokens generated per sample (and per throughput request)."""
    throughput_batch_size: int = 8
    """Sequences generated at once when measuring generation throughput."""

    def problems(self) -> list[str]:
        return _at_least(self, "evaluate", ("eval_batches", "throughput_batch_size"), 1)


@dataclass
class RegistryConfig:
    """MLflow model registry and the champion/challenger gate (``registry``)."""

    model_name: str = "moeops-moe"
    """Registered model name."""
    metric: RegistryMetric = RegistryMetric.val_loss
    """Evaluation figure the gate compares."""
    mode: Mode = Mode.min
    """Whether a lower (min) or higher (max) metric wins."""
    min_improvement: float = 0.0
    """A challenger must beat the champion by at least this much (metric units)."""
    champion_alias: str = "champion"
    """Alias of the served model."""
    challenger_alias: str = "challenger"
    """Alias of the latest registered version."""
    require_dense_win: bool = True
    """With no earlier champion, promote the challenger only when its held-out val_loss is below
    its dense equivalent's (evaluate's dense baseline); false: the first one is promoted anyway."""

    def problems(self) -> list[str]:
        if self.champion_alias == self.challenger_alias:
            return [
                f"registry.challenger_alias={self.challenger_alias!r}: must differ from "
                "registry.champion_alias"
            ]
        return []


@dataclass
class AutoscalingConfig:
    """Serve's request-based autoscaling of the replicas (``serve.autoscaling``)."""

    enabled: bool = False
    """Autoscale between min_replicas and max_replicas (else serve.num_replicas)."""
    min_replicas: int = 1
    """Fewest replicas."""
    max_replicas: int = 2
    """Most replicas."""
    target_ongoing_requests: float = 8.0
    """Requests in flight per replica that Serve steers towards."""
    upscale_delay_s: float = 30.0
    """How long load stays above target before a replica is added."""
    downscale_delay_s: float = 600.0
    """How long load stays below target before a replica is removed."""
    look_back_period_s: float = 30.0
    """Window the load is averaged over (longer than metrics_interval_s)."""
    metrics_interval_s: float = 10.0
    """How often replicas push their load (deprecated by Ray 2.60; sent only when changed)."""

    def problems(self) -> list[str]:
        if not self.enabled:
            return []
        p = []
        if not 1 <= self.min_replicas <= self.max_replicas:
            p.append(
                f"serve.autoscaling.min_replicas={self.min_replicas}: need 1 <= min_replicas <= "
                f"max_replicas ({self.max_replicas})"
            )
        if (
            self.upscale_delay_s < 0
            or self.downscale_delay_s < 0
            or self.look_back_period_s <= 0
            or self.target_ongoing_requests <= 0
            or self.metrics_interval_s <= 0
        ):
            p.append(
                "serve.autoscaling: delays must be >= 0, look_back_period_s, "
                "target_ongoing_requests and metrics_interval_s > 0 "
                f"(got upscale_delay_s={self.upscale_delay_s}, "
                f"downscale_delay_s={self.downscale_delay_s}, "
                f"look_back_period_s={self.look_back_period_s}, "
                f"target_ongoing_requests={self.target_ongoing_requests}, "
                f"metrics_interval_s={self.metrics_interval_s})"
            )
        elif self.look_back_period_s <= self.metrics_interval_s:
            p.append(
                f"serve.autoscaling.look_back_period_s={self.look_back_period_s}: must be > "
                f"serve.autoscaling.metrics_interval_s ({self.metrics_interval_s}), the window "
                "must hold load figures"
            )
        return p


@dataclass
class ServeConfig:
    """Ray Serve application (group ``serve``)."""

    name: str = "local"
    """Name of the group option."""
    app_name: str = "moeops"
    """Serve application name."""
    engine: ServeEngine = ServeEngine.moeops
    """moeops: the embedded engine (CPU or GPU); vllm: Ray Serve LLM on GPU replicas (HF export)."""
    host: str = "127.0.0.1"
    """HTTP host the proxy listens on."""
    port: int = 8000
    """HTTP port the proxy listens on."""
    route_prefix: str = "/"
    """Route prefix of the application."""
    model_uri: str = ""
    """models:/<name>@<alias> or models:/<name>/<version>; empty: the registry's champion."""
    num_replicas: int = 1
    """Replicas when autoscaling is off."""
    num_cpus: float = 0.5
    """CPUs per replica."""
    num_gpus: float = 0.0
    """GPUs per replica."""
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    """Request-based autoscaling."""
    max_num_seqs: int = 16
    """Continuous batching: sequences decoded together (KV-cache slots per model and replica)."""
    max_num_batched_tokens: int = 512
    """Prompt tokens admitted into one decode step."""
    max_queued_sequences: int = 64
    """Sequences waiting for a slot per replica; beyond it a request gets 429."""
    retry_after_s: int = 1
    """Retry-After seconds of a 429 (queue full) or 503 (not ready yet)."""
    max_prompt_tokens: int = 128
    """Longest prompt accepted."""
    max_tokens: int = 64
    """Most tokens a request may ask for."""
    max_prompts: int = 16
    """Most prompts in one completions request."""
    max_n: int = 4
    """Upper bound of a request's n and best_of."""
    max_logprobs: int = 20
    """Upper bound of completions' logprobs and chat's top_logprobs."""
    max_body_bytes: int = 65536
    """Largest request body."""
    canary_fraction: float = 0.0
    """Fraction of requests the challenger answers."""
    quantize: Quantize = Quantize.auto
    """int8 inference: auto (where measured faster), int8 (always), none (docs/quantization.md)."""
    auth_token_env: str = "MOEOPS_API_TOKEN"
    """Environment variable holding the bearer token; unset or empty: auth off."""
    smoke_prompt: str = "def "
    """Prompt of the deploy stage's test completion."""
    max_ongoing_requests: int = 96
    """HTTP requests Serve sends a replica at once (>= max_num_seqs + queue, plus probes)."""
    max_surge_percent: int = 100
    """Extra replicas (percent) during a rolling update."""
    proxy_location: ProxyLocation = ProxyLocation.HeadOnly
    """HeadOnly (one proxy, local), EveryNode (clusters) or Disabled."""
    load_retry_s: float = 2.0
    """A replica that cannot load its model yet (no alias) retries this often, unready."""
    ready_timeout_s: float = 180.0
    """Deploy stage: how long to wait for /readyz."""
    block: bool = False
    """Deploy stage: keep serving until Ctrl-C or SIGTERM."""

    def problems(self) -> list[str]:
        p = self.autoscaling.problems()
        keys = ("max_tokens", "max_num_seqs", "max_prompts", "max_n", "max_queued_sequences")
        p += _at_least(self, "serve", (*keys, "retry_after_s"), 1)
        p += _at_least(self, "serve", ("max_logprobs",), 0)
        if self.engine == ServeEngine.vllm:
            if self.num_gpus < 1 or self.num_gpus != int(self.num_gpus):
                p.append(
                    f"serve.engine='vllm' needs GPU replicas: serve.num_gpus={self.num_gpus} must "
                    "be a whole number >= 1 (each replica's vLLM engine, tensor-parallel over that "
                    "many GPUs); vLLM does not run on CPU: use serve.engine=moeops there"
                )
            if self.quantize == Quantize.int8:
                p.append(
                    "serve.quantize='int8' is moeops' own int8 path; with serve.engine='vllm' set "
                    "serve.quantize=auto or none (vLLM serves the export's weights)"
                )
        if not 0 <= self.canary_fraction <= 1:
            p.append(f"serve.canary_fraction={self.canary_fraction}: must be in [0, 1]")
        if (
            self.quantize == Quantize.int8
            and self.num_gpus > 0
            and importlib.util.find_spec("torchao") is None
        ):
            p.append(
                "serve.quantize='int8' on GPU replicas (serve.num_gpus > 0) uses torchao, which "
                "is not installed: pip install 'moeops[cuda-int8]', or set serve.quantize=auto "
                "or none"
            )
        if not 0 < self.port < 65536:
            p.append(f"serve.port={self.port}: must be a TCP port (1-65535)")
        if self.max_num_batched_tokens < self.max_prompt_tokens:
            p.append(
                f"serve.max_num_batched_tokens={self.max_num_batched_tokens}: must be >= "
                f"serve.max_prompt_tokens ({self.max_prompt_tokens}) or a long prompt could "
                "never be admitted"
            )
        if not 0 <= self.max_surge_percent <= 100:
            p.append(f"serve.max_surge_percent={self.max_surge_percent}: must be in [0, 100]")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            p.append(f"serve.num_cpus={self.num_cpus}: a replica needs some CPU or GPU")
        if self.max_ongoing_requests < self.max_num_seqs:
            p.append(
                f"serve.max_ongoing_requests={self.max_ongoing_requests}: must be >= "
                f"serve.max_num_seqs ({self.max_num_seqs}) or the decoding slots can never fill"
            )
        if self.max_prompt_tokens < 1 or self.max_body_bytes < 256:
            p.append(
                f"serve.max_prompt_tokens={self.max_prompt_tokens}, "
                f"serve.max_body_bytes={self.max_body_bytes}: must be >= 1 and >= 256"
            )
        if not self.route_prefix.startswith("/"):
            p.append(f"serve.route_prefix={self.route_prefix!r}: must start with '/'")
        if self.model_uri and not self.model_uri.startswith("models:/"):
            p.append(
                f"serve.model_uri={self.model_uri!r}: must be models:/<name>@<alias> or "
                "models:/<name>/<version>"
            )
        if not self.autoscaling.enabled and self.num_replicas < 1:
            p.append(f"serve.num_replicas={self.num_replicas}: must be >= 1")
        return p


@dataclass
class TrackingConfig:
    """MLflow tracking (group ``tracking``)."""

    name: str = "sqlite"
    """Name of the group option."""
    uri: str = ""
    """Tracking URI; empty: $MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db."""
    experiment: str = "moeops"
    """MLflow experiment name."""
    artifact_location: str = ""
    """Artifact root of new experiments on a sqlite store; empty: <cwd>/mlartifacts."""

    def problems(self) -> list[str]:
        return []


@dataclass
class KubernetesConfig:
    """KubeRay manifests rendered by ``python -m infra.render`` (``cluster.k8s``)."""

    namespace: str = "moeops"
    """Kubernetes namespace."""
    image: str = "moeops:latest"
    """Image holding the project and its dependencies (infra/Dockerfile)."""
    head_cpus: int = 8
    """CPUs of the Ray head pod."""
    head_memory: str = "32Gi"
    """Memory of the Ray head pod."""
    gpus_per_node: int = 8
    """GPUs of each worker pod (one per node); 0 renders a CPU-only worker group."""
    worker_cpus: int = 96
    """CPUs of each worker pod."""
    worker_memory: str = "768Gi"
    """Memory of each worker pod."""
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    """Node selector value for nvidia.com/gpu.product (empty: no selector)."""
    secret_name: str = "moeops-credentials"
    """Secret with the S3, PostgreSQL and MLflow credentials (created with kubectl)."""
    tracking_uri: str = ""
    """An existing tracking server; empty: render one (PostgreSQL backend, S3 artifacts)."""
    mlflow_image: str = "ghcr.io/mlflow/mlflow:v3.17.2"
    """Image of the rendered MLflow server."""
    mlflow_artifacts_uri: str = "s3://moeops/mlflow"
    """Artifact store of the rendered MLflow server."""
    job_ttl_seconds: int = 3600
    """RayJob: delete the cluster this long after the job ends."""
    job_deadline_seconds: int = 172800
    """RayJob: kill the job after this long."""

    def problems(self) -> list[str]:
        p = _at_least(self, "cluster.k8s", ("gpus_per_node", "job_ttl_seconds"), 0)
        p += _at_least(self, "cluster.k8s", ("head_cpus", "worker_cpus", "job_deadline_seconds"), 1)
        for key in ("namespace", "image", "secret_name"):
            if not getattr(self, key):
                p.append(f"cluster.k8s.{key}='': must be set")
        if self.tracking_uri and "://" not in self.tracking_uri:
            p.append(
                f"cluster.k8s.tracking_uri={self.tracking_uri!r}: must be a URI such as "
                "http://mlflow.example:5000"
            )
        return p


@dataclass
class ClusterConfig:
    """Where Ray runs (group ``cluster``)."""

    name: str = "local"
    """Name of the group option."""
    mode: ClusterMode = ClusterMode.local
    """local: start a single-node Ray here; remote: join $RAY_ADDRESS or address."""
    address: str = ""
    """Address of the cluster to join (mode=remote)."""
    num_cpus: int = 4
    """Logical CPUs of the local node (may exceed the physical cores)."""
    num_gpus: int = 0
    """GPUs of the local node."""
    object_store_memory_mb: int = 512
    """Object store of the local node."""
    namespace: str = "moeops"
    """Ray namespace."""
    k8s: KubernetesConfig = field(default_factory=KubernetesConfig)
    """KubeRay manifests."""

    def problems(self) -> list[str]:
        return self.k8s.problems()


@dataclass
class Config:
    """The whole configuration; each section is a group under ``conf/`` or a plain key."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    """Local state."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer, packing."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Cold, warm and hot tiers."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The transformer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Ray Train."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Ray Tune."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """The evaluate stage."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The registry gate."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Ray Serve."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster."""
    force: bool = False
    """Rerun stages even when a finished run with the same key exists."""
    run_name: str = ""
    """Name of the parent MLflow run; empty: run-<timestamp>."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Upstream stage -> MLflow run id (or runs:/<id>) to read its outputs from."""
    stages: list[Stage] = field(default_factory=lambda: list(Stage))
    """Stages pipelines.run executes, in order."""

    def sections(self) -> list[Any]:
        return [
            self.paths,
            self.data,
            self.storage,
            self.model,
            self.train,
            self.tune,
            self.evaluate,
            self.registry,
            self.serve,
            self.tracking,
            self.cluster,
        ]
